"""The benchmark code runs (no timing is asserted: numbers live in docs/benchmarks.md)."""

import pytest

from epo_cli import bench

pytestmark = pytest.mark.slow


def test_update_cases_run_on_the_same_tokens():
    naive = bench._update_case("naive", "tiny", 2, 1, 1)
    ours = bench._update_case("ours", "tiny", 2, 1, 1)
    assert naive["tokens"] == ours["tokens"] > 0 and naive["params"] == ours["params"]
    text = bench.render_update("tiny", 2, 1, naive, ours, ours, ours, ours, naive, 1e9, 5e8)
    assert "| ours |" in text and "MFU | 50.0%" in text


def test_rollout_cases_and_env_rows_render():
    raw = bench._rollout_case("raw", "tiny", 2, 4)
    ours = bench._rollout_case("ours", "tiny", 2, 4)
    assert raw["tokens"] == ours["tokens"] == 8  # a random tiny model never stops early
    assert "tokens/s" in bench.render_rollout("tiny", 2, 4, raw, ours)
    assert "| alfworld | pool, 2 workers | 10.0 | 2.00x |" in bench.render_envs([("alfworld", "pool, 2 workers", 10.0, 2.0)])


def test_scaling_rows_measure_one_and_two_processes():
    rows = bench.scaling_rows("tiny", 4, 1)
    assert [(label, world) for label, world, _ in rows] == [("one process", 1), ("ddp", 2), ("fsdp2", 2)]
    assert len({result["tokens"] for _, _, result in rows}) == 1  # the same global batch everywhere
    assert "| ddp | 2 |" in bench.render_scaling("tiny", 4, rows)


def test_a_partial_run_replaces_only_its_part():
    document = bench.merge_part(bench.merge_part("# B\n", "envs", "envs v1"), "update", "update v1")
    document = bench.merge_part(document, "envs", "envs v2")
    assert document.index("envs v2") < document.index("update v1") and "envs v1" not in document
    assert document.count("<!-- bench:envs -->") == 1


def test_compile_rows_time_eager_and_compiled_chunks():
    eager = bench._chunk_case(False, "tiny", 8, 1)
    compiled = bench._chunk_case(True, "tiny", 8, 1)
    assert eager > 0 and compiled > 0
    assert "| 8 | " in bench.render_compile("tiny", [(8, eager, compiled)])
