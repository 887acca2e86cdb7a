import pytest

from epo_cli.envs.base import (
    PromptState,
    TaskInstance,
    TaskSampler,
    build_prompt,
    check_action,
    grouped_tasks,
    parse_action,
    stratified_order,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>go</think><action>open door to kitchen</action>", "open door to kitchen"),
        ("<think>x</think>\n<action>  look\n around </action><|im_end|>", "look around"),
        ("<THINK>x</THINK><ACTION>wait</ACTION>", "wait"),
        ("<action>look around</action>", None),  # no think
        ("<think>x</think>", None),  # no action
        ("<action>look</action><think>x</think>", None),  # action before think
        ("<think>x</think><action>a</action><action>b</action>", None),  # duplicated
        ("<think>x</think><action><action>a</action></action>", None),  # nested
        ("<think>x</think><action>   </action>", None),  # empty
        ("<think>x</think><action>" + "a" * 500 + "</action>", None),  # enormous
        ("", None),
        ("<think>\x00</think><action>go\x07 north</action>", "go north"),
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<think>x</think>", "no <action>...</action> block"),
        ("<think>x</think><action>a</action><action>b</action>", "2 <action> blocks, expected one"),
        ("<action>a</action>", "no <think>...</think> block"),
        ("<action>a</action><think>x</think>", "<action> comes before </think>"),
        ("<think>x</think><action> </action>", "empty action"),
        ("<think>x</think><action><action>a</action></action>", "a tag inside the action"),
        ("<think>x</think><action>" + "a" * 500 + "</action>", "action longer than 200 characters"),
        ("<think>x</think><action>go north</action>", None),
    ],
)
def test_check_action_says_why_an_answer_is_invalid(text, reason):
    action, why = check_action(text)
    assert why == reason
    assert (action is None) == (reason is not None)


def test_prompt_has_the_paper_sections():
    state = PromptState("boil water", "You are in the kitchen.", ["open OBJ", "go OBJ"],
                        past_actions=["look around", "go to kitchen", "open fridge"],
                        past_observations=["hallway", "corridor", "kitchen"])
    messages = build_prompt("ScienceWorld", state, turn=3, max_turns=30, history_length=2, max_listed_actions=1)
    user = messages[-1]["content"]
    assert "Your task: boil water" in user
    assert "Step 4 of 30." in user
    assert "Actions taken so far: look around; go to kitchen; open fridge" in user
    assert "[Observation] corridor\n[Your action] go to kitchen" in user
    assert "[Observation] hallway" not in user  # only the last two pairs
    assert "Current observation: You are in the kitchen." in user
    assert "Admissible actions: open OBJ (and 1 more)" in user
    assert "<think>" in user and "<action>" in user


def test_task_sampler_is_deterministic_and_resumable():
    tasks = [TaskInstance("e", f"t{i % 3}", i % 3, i) for i in range(10)]
    first = TaskSampler(tasks, seed=7).sample(25)
    again = TaskSampler(tasks, seed=7).sample(25)
    assert first == again
    resumed = TaskSampler(tasks, seed=7, position=12).sample(13)
    assert resumed == first[12:]
    assert [t.variation for t in TaskSampler(tasks, seed=8).sample(10)] != [t.variation for t in first[:10]]
    assert sorted(t.variation for t in first[:10]) == list(range(10))  # an epoch covers every task once


def test_stratified_order_spreads_types():
    items = [("a", i) for i in range(5)] + [("b", i) for i in range(2)] + [("c", 0)]
    ordered = stratified_order(items, lambda x: x[0], seed=1)
    assert {x[0] for x in ordered[:3]} == {"a", "b", "c"}
    assert sorted(ordered) == sorted(items)
    assert ordered == stratified_order(items, lambda x: x[0], seed=1)


def test_grpo_groups_play_the_same_instance():
    tasks = [TaskInstance("e", "t", i, i) for i in range(6)]
    grouped, group_ids = grouped_tasks(TaskSampler(tasks, seed=3), tasks_per_step=2, group_size=3)
    assert group_ids == [0, 0, 0, 1, 1, 1]
    assert grouped[0] == grouped[1] == grouped[2] and grouped[3] == grouped[4] == grouped[5]
    assert grouped[0] != grouped[3]
