"""The GPU check's CPU dry mode (scripts/gpu_check.py --device cpu --dry): every stage runs
at tiny sizes, with MLflow made unimportable, as on the GPU machine's image."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_stage_without_mlflow(tmp_path):
    blocker = tmp_path / "block" / "mlflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('mlflow is not installed on the GPU image')\n")
    env = dict(os.environ, PYTHONPATH=f"{blocker.parent}{os.pathsep}{ROOT}", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "out"
    finished = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--dry", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    runs = ["train dry bf16", "train dry bf16 compile_lm_head", "train dry bf16 no fast_forward",
            "train dry bf16 multiturn windowed", "train dry bf16 multiturn packed"]
    assert list(stages) == ["model dry", "parity dry", *runs]
    parity = stages["parity dry"]
    assert parity["fp32_max_abs_logp"] == 0.0 and 0 < parity["bf16_max_abs_logp"] < 0.1  # same device; bf16 differs
    for name in runs:
        train = stages[name]
        assert train["steps"] == 2 and train["update_tokens_per_s"] > 0 and train["rollout_tokens_per_s"] > 0
        assert train["peak_gpu_memory_gib"] is None and train["update_mfu"] is None  # CPU: no GPU figures
    # The packed update reads each multi-turn episode once instead of once per turn.
    assert stages["train dry bf16 multiturn packed"]["update_tokens"] < stages["train dry bf16 multiturn windowed"]["update_tokens"]
    table = (out / "gpu_check.md").read_text()
    assert "| cpu fp32 | 0.00e+00 |" in table and "| train dry bf16 | 3M | 8 |" in table
