"""The benchmark code runs (no timing is asserted: numbers live in docs/benchmarks.md)."""

import sys

import pytest

from epo_cli.bench import cli, envs, lora, merge_part, packed, recipe_rollout, rollout, scaling, update
from epo_cli.bench import compile as compile_part


@pytest.mark.slow
def test_update_cases_run_on_the_same_tokens():
    naive = update.update_case("naive", "tiny", 2, 1, 1)
    ours = update.update_case("ours", "tiny", 2, 1, 1)
    assert naive["tokens"] == ours["tokens"] > 0 and naive["params"] == ours["params"]
    bf16 = update.update_case("ours-bf16", "tiny", 2, 1, 1)
    assert bf16["tokens"] == ours["tokens"]
    text = update.render_update("tiny", 2, 1, naive, ours, ours, ours, ours, bf16, naive, 1e9, 5e8)
    assert "| ours |" in text and "| ours under bf16 autocast" in text and "MFU | 50.0%" in text


@pytest.mark.slow
def test_rollout_cases_and_env_rows_render():
    raw = rollout._rollout_case("raw", "tiny", 2, 4)
    ours = rollout._rollout_case("ours", "tiny", 2, 4)
    assert raw["tokens"] == ours["tokens"] == 8  # a random tiny model never stops early
    assert "tokens/s" in rollout.render_rollout("tiny", 2, 4, raw, ours)
    assert "| alfworld | pool, 2 workers | 10.0 | 2.00x |" in envs.render_envs([("alfworld", "pool, 2 workers", 10.0, 2.0)])


@pytest.mark.slow
def test_recipe_rollout_plays_the_same_step_every_windowed_way():
    """One step of the ALFWorld recipe on the real engine, with the tiny model, through
    every sampler path."""
    spec_file = recipe_rollout.RECIPES["ALFWorld pick_and_place_simple"]
    cases = [recipe_rollout._recipe_case(spec_file, "tiny", *setting[1:]) for setting in recipe_rollout.SETTINGS]
    assert all(case["episodes"] == 8 and case["turns"] > 0 for case in cases)
    exact = [case for case, setting in zip(cases, recipe_rollout.SETTINGS) if setting[4:] == ("windowed", "float32")]
    assert len(exact) == 3 and all(case["responses"] == cases[0]["responses"] for case in exact)
    assert cases[-1]["prompt_tokens"] > cases[0]["prompt_tokens"]  # a conversation prompt holds the whole episode
    table = recipe_rollout.render_recipe_rollout("tiny", [("ALFWorld", cases, 3), ("none", cases, None)])
    assert "| ALFWorld | 8 |" in table and "| + bf16 weights: " in table and table.rstrip().endswith("| none measured | yes |")
    assert table.count("speed-up") == len(recipe_rollout.SETTINGS) - 1


def test_each_recipe_names_the_path_it_runs(monkeypatch):
    """The windowed ALFWorld recipe samples windowed, the ScienceWorld one in the conversation
    format; each with a bf16 copy only where the processor has native bf16."""
    for native, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr("epo_cli.precision.native_bf16", lambda: native)
        paths = {name: recipe_rollout.recipe_setting(spec_file) for name, spec_file in recipe_rollout.RECIPES.items()}
        settings = {name: None if index is None else recipe_rollout.SETTINGS[index][4:] for name, index in paths.items()}
        assert settings["ALFWorld pick_and_place_simple"] == ("windowed", dtype)
        expected = ("conversation", "bfloat16") if native else None  # no fp32 conversation setting
        assert settings["ScienceWorld find-non-living-thing"] == expected


@pytest.mark.slow
def test_scaling_rows_measure_one_and_two_processes():
    rows = scaling.scaling_rows("tiny", 4, 1)
    assert [(label, world) for label, world, _ in rows] == [("one process", 1), ("ddp", 2), ("fsdp2", 2)]
    assert len({result["tokens"] for _, _, result in rows}) == 1  # the same global batch everywhere
    assert "| ddp | 2 |" in scaling.render_scaling("tiny", 4, rows)


def test_a_partial_run_replaces_only_its_part():
    document = merge_part(merge_part("# B\n", "envs", "envs v1"), "update", "update v1")
    document = merge_part(document, "envs", "envs v2")
    assert document.index("envs v2") < document.index("update v1") and "envs v1" not in document
    assert document.count("<!-- bench:envs -->") == 1


def test_main_keeps_the_blocks_it_does_not_measure(tmp_path, monkeypatch):
    out = tmp_path / "benchmarks.md"
    old = merge_part(merge_part(merge_part("# Benchmarks\n\nMeasured long ago.\n", "envs", "envs v1"), "update", "update v1"),
                     "gpu", "gpu v1")
    out.write_text(old)
    monkeypatch.setitem(cli.MEASURE, "envs", lambda args: f"envs v2, {args.steps} steps")
    monkeypatch.setattr(sys, "argv", ["bench", "--only", "envs", "--steps", "3", "--out", str(out)])
    cli.main()
    document = out.read_text()
    assert document.startswith("# Benchmarks\n\nMeasured ") and "long ago" not in document
    assert "envs v2, 3 steps" in document and "envs v1" not in document
    assert document.index("envs v2") < document.index("update v1") < document.index("gpu v1")


def test_a_part_that_fails_keeps_the_parts_measured_before_it(tmp_path, monkeypatch):
    out = tmp_path / "benchmarks.md"

    def broken(args):
        raise ModuleNotFoundError("No module named 'datasets'")

    monkeypatch.setitem(cli.MEASURE, "envs", lambda args: "envs v2")
    monkeypatch.setitem(cli.MEASURE, "update", broken)
    monkeypatch.setattr(sys, "argv", ["bench", "--only", "envs", "--only", "update", "--out", str(out)])
    with pytest.raises(ModuleNotFoundError):
        cli.main()
    assert "envs v2" in out.read_text() and list(tmp_path.iterdir()) == [out]


def test_the_parts_keep_their_names_and_order():
    assert cli.PARTS == ("envs", "update", "compile", "rollout", "recipe_rollout", "scaling", "packed", "lora")


@pytest.mark.slow
def test_compile_rows_time_eager_and_compiled_chunks():
    eager = compile_part._chunk_case(False, "tiny", 8, 1)
    compiled = compile_part._chunk_case(True, "tiny", 8, 1)
    assert eager > 0 and compiled > 0
    assert "| 8 | " in compile_part.render_compile("tiny", [(8, eager, compiled)])


@pytest.mark.slow
def test_packed_case_plays_and_times_both_paths():
    result = packed._packed_case(recipe_rollout.RECIPES["ALFWorld pick_and_place_simple"], "tiny", 1, 1, max_turns=2)
    assert result["turns"] >= 1 and result["segments"] >= 1
    assert result["packed_tokens"] <= result["per_turn_tokens"] and result["packed_s"] > 0 and result["per_turn_s"] > 0
    assert result["rollout_conversation_s"] > 0 and result["rollout_windowed_s"] > 0 and result["windowed_update_s"] > 0
    assert 1 <= result["windowed_turns"] <= 2
    table = packed.render_packed("tiny", [("ALFWorld", result)])
    assert "| ALFWorld | 1 |" in table
    step_ratio = (result["rollout_windowed_s"] + result["windowed_update_s"]) / (result["rollout_conversation_s"] + result["packed_s"])
    assert table.rstrip().endswith(f"| {step_ratio:.2f}x |")


@pytest.mark.slow
def test_lora_rows_train_fewer_parameters_and_write_smaller_checkpoints():
    full = lora.lora_case(None, "tiny", 2, 1, 1)
    rank = lora.lora_case(8, "tiny", 2, 1, 1)
    assert rank["tokens"] == full["tokens"] > 0
    # r (in + out) per projection, hidden 64, k/v 32, MLP 128: 8 (128 + 96 + 96 + 128 + 3 x 192) = 8192 a layer, 2 layers
    assert rank["trained"] == 16384 < full["trained"]
    assert 0 < rank["checkpoint_mb"] < full["checkpoint_mb"] / 10
    table = lora.render_lora("tiny", 2, 1, [(None, full), (8, rank)])
    assert "| full fine-tuning (baseline) |" in table and "| LoRA rank 8 |" in table
    assert f"rank 8 {12 * 16384 / 2**20:,.0f} MB" in table  # gradients + AdamW moments: 12 bytes a trained parameter
