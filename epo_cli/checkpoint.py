"""Checkpoints written atomically: a temporary folder renamed into place when complete."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "sampler": generator.get_state()}


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])


def save_checkpoint(
    root: Path,
    step: int,
    policy,
    tokenizer,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    spec_yaml: str,
    keep: int,
    policy_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``root/step_NNNNNN`` (policy in transformers format, everything else in one
    torch file, a JSON summary, the spec; ``policy_state`` replaces the policy's own weights,
    e.g. gathered from shards) and keep the newest ``keep`` checkpoints. A crash
    mid-write leaves only a hidden temporary folder; earlier checkpoints are untouched."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        policy.save_pretrained(staging / "policy", state_dict=policy_state)
        tokenizer.save_pretrained(staging / "policy")
        torch.save(trainer_state, staging / STATE_FILE)
        (staging / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
        (staging / "spec.yaml").write_text(spec_yaml)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in Path(root).glob("step_*") if (p / META_FILE).exists())
    return found[-1] if found else None


def find_checkpoint(target: str, tracking_uri: str | None) -> Path:
    """A checkpoint directory, a run's checkpoint root, or an MLflow run id -> the newest
    checkpoint folder."""
    path = Path(target)
    if (path / META_FILE).exists():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint (step_*/{META_FILE}) inside")
        return found
    from mlflow.tracking import MlflowClient

    from epo_cli.tracking import resolve_uri

    try:
        spec_text = MlflowClient(resolve_uri(tracking_uri)).download_artifacts(target, "spec.yaml")
    except Exception as err:
        raise FileNotFoundError(f"{target}: not a checkpoint directory, and not an MLflow run with a spec.yaml ({str(err).splitlines()[0]})") from None
    import yaml

    root = Path(yaml.safe_load(Path(spec_text).read_text())["checkpoint"]["dir"]) / target
    found = latest_checkpoint(root)
    if found is None:
        raise FileNotFoundError(f"run {target}: no checkpoint under {root}")
    return found
