import pytest

from epo_cli.evaluate import EvalResult, eval_tasks, wilson_interval


def test_wilson_interval_hand_values():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0, 4)
    assert low == 0.0 and high == pytest.approx(0.4899, abs=1e-4)
    assert wilson_interval(16, 16)[1] == 1.0


def test_eval_sets_are_fixed_and_span_task_types():
    first = eval_tasks("scienceworld", None, "iid", 29)
    assert first == eval_tasks("scienceworld", None, "iid", 29)
    assert len({t.task_type for t in first}) == 29
    ood = eval_tasks("scienceworld", None, "ood", 5)
    assert all(t.variation not in {x.variation for x in first if x.task_type == t.task_type} for t in ood)
    with pytest.raises(ValueError, match="unknown evaluation split"):
        eval_tasks("scienceworld", None, "train", 3)


def test_eval_metrics_keys():
    result = EvalResult("ood", episodes=10, successes=5, mean_turns=3.0, invalid_action_rate=0.25)
    metrics = result.metrics()
    assert metrics["eval/ood/success_rate"] == 0.5
    assert metrics["eval/ood/success_ci_low"] == pytest.approx(0.2366, abs=1e-4)
    assert metrics["eval/ood/episodes"] == 10


def test_repeats_play_each_task_with_its_own_seed():
    tasks = eval_tasks("toy", None, "iid", 3, repeats=2)
    assert [t.task_id for t in tasks] == [tasks[0].task_id] * 2 + [tasks[2].task_id] * 2 + [tasks[4].task_id] * 2
    assert tasks[0].seed != tasks[1].seed and len({t.key for t in tasks}) == 6


def test_sign_test_p_by_hand():
    from epo_cli.evaluate import sign_test_p

    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(1, 6) == pytest.approx(2 * (1 + 7) / 128)
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0


def test_paired_comparison_pairs_by_task_and_seed():
    from epo_cli.evaluate import EpisodeOutcome, compare_paired

    def outcomes(wins):
        return [EpisodeOutcome(f"g{i // 2}", i % 2, won, float(won), 4, 0) for i, won in enumerate(wins)]

    before = outcomes([False, False, True, False, False, False])
    after = outcomes([True, True, True, False, True, True])
    extra = [EpisodeOutcome("unpaired", 0, True, 1.0, 4, 0)]
    c = compare_paired(before, after + extra)
    assert (c.pairs, c.before, c.after) == (6, pytest.approx(1 / 6), pytest.approx(5 / 6))
    assert (c.tasks_worse, c.tasks_better) == (0, 2) and c.sign_test_p == pytest.approx(2 / 4)
    low, high = c.bootstrap_interval
    assert 0 <= low <= c.difference <= high <= 1 and low < high
    with pytest.raises(ValueError, match="no episode in common"):
        compare_paired(before, extra)
