"""The golden-run check: fixed-seed runs (fp32, CPU) whose logged metrics must not change
when code moves. Exact on the machine that wrote ``tests/golden/runs.json``, within
``ELSEWHERE_RTOL`` and ``ELSEWHERE_ATOL`` on another (other CPU kernels can round differently); a metric key may be
added, a stored one may not change or vanish. ``EPO_WRITE_GOLDEN=1`` rewrites the file: a
commit that changes it says why."""

import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli.cli import app

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "runs.json"
ELSEWHERE_RTOL = 1e-4
# A metric that cancels to 0 (a GRPO or step-0 PPO surrogate: advantages summing to zero)
# is fp32 rounding of O(1) terms, a few 1e-7 on one CPU and others on another.
ELSEWHERE_ATOL = 1e-6
FP32 = ["--set", "model.autocast=none", "--set", "rollout.dtype=float32"]
RUNS = {  # the PPO (GAE, critic) and GRPO paths, the toy and a real engine (no data files needed)
    "toy-multiturn ppo+epo": ["--env", "toy-multiturn", "--algo", "ppo+epo", "--steps", "3", "--set", "eval.every=3",
                              "--set", "eval.episodes=4"],
    "toy-multiturn grpo+epo": ["--env", "toy-multiturn", "--algo", "grpo+epo", "--steps", "3", "--set", "eval.every=3",
                               "--set", "eval.episodes=4"],
    "scienceworld tiny ppo+epo": ["--env", "scienceworld", "--model", "tiny", "--algo", "ppo+epo", "--steps", "1",
                                  "--set", "env.max_turns=2", "--set", "rollout.max_response_tokens=12",
                                  "--set", "rollout.tasks_per_step=2",
                                  # The CPU scale sets the cap only where bf16 is native: pinned, as where the run was stored.
                                  "--set", "algo.tis_cap=2"],
}


def machine() -> str:
    """What decides whether two runs can agree to the last bit: CPU, its kernels, torch."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _logged(tmp_path: Path, name: str, args: list[str]) -> dict[str, dict[str, float]]:
    """{metric: {step: value}} of one run, timings (perf/*) left out."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(app, ["train", *args, *FP32, "--seed", "0", "--run-name", name, "--tracking-uri", uri,
                                      "--set", f"checkpoint.dir={tmp_path}/ckpt"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id], f"attributes.run_name = '{name}'")
    return {key: {str(m.step): m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in sorted(run.data.metrics) if not key.startswith("perf/")}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_runs_log_the_stored_metrics(tmp_path, name):
    got = _logged(tmp_path, name, RUNS[name])
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"machine": machine(), "runs": {}}
    if os.environ.get("EPO_WRITE_GOLDEN") == "1":
        stored["machine"] = machine()
        stored["runs"][name] = got
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    assert name in stored["runs"], f"{GOLDEN} has no run {name!r}: write it with EPO_WRITE_GOLDEN=1"
    exact = stored["machine"] == machine()
    for key, by_step in stored["runs"][name].items():
        assert key in got, f"{name}: metric {key} is no longer logged"
        for step, value in by_step.items():
            assert step in got[key], f"{name}: {key} not logged at step {step}"
            new = got[key][step]
            same = new == value or (math.isnan(new) and math.isnan(value))
            assert same or (not exact and math.isclose(new, value, rel_tol=ELSEWHERE_RTOL, abs_tol=ELSEWHERE_ATOL)), (
                f"{name}: {key} at step {step} is {new!r}, stored {value!r}"
                + ("" if exact else f" (another machine: {stored['machine']}; within rtol {ELSEWHERE_RTOL}, atol {ELSEWHERE_ATOL} expected)")
            )
