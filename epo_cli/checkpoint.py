"""Checkpoints: written atomically (a temporary folder renamed into place when complete)
and read without running any code: tensors in safetensors files, everything else in JSON.
This module alone reads and writes the format."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
META_FILE = "checkpoint.json"
PICKLED_STATE = "trainer_state.pt"  # the earlier, pickled format: refused
POLICY_DIR = "policy"
ADAPTER_DIR = "adapter"  # a LoRA run's adapters (peft format)
STATE_FORMAT = 1
# JSON stand-ins for what JSON lacks: a tensor (by its key in the safetensors file), a
# tuple, and a dict whose keys are not all strings.
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


# A write that failed for lack of room: the disk or quota is full, or a file-size limit.
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CheckpointSpaceError(RuntimeError):
    """A checkpoint could not be written for lack of space; earlier checkpoints are intact."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, corrupt or unsafe); the
    message is one line naming the file."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], aliases: dict[tuple, str]) -> Any:
    """``value`` as JSON data, its tensors moved into ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        alias = (storage, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if alias in aliases:  # the same tensor again (tied weights): stored once
            return {TENSOR: aliases[alias]}
        if any(seen[0] == storage for seen in aliases):  # another view of stored memory
            tensor = tensor.clone()
        key = str(len(tensors))
        tensors[key] = tensor
        aliases[(tensor.untyped_storage().data_ptr(), tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))] = key
        return {TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in (TENSOR, TUPLE, ITEMS) for k in value):
            return {k: _encode(v, tensors, aliases) for k, v in value.items()}
        return {ITEMS: [[_encode(k, tensors, aliases), _encode(v, tensors, aliases)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors, aliases) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, aliases) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state: cannot store a {type(value).__name__} (tensors, numbers, strings, lists, tuples and dicts only)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[TUPLE])
    if ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """``state`` (nested dicts, lists, tuples, numbers, strings, tensors) as
    ``trainer_state.safetensors`` + ``trainer_state.json`` in ``folder``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    document = {"format": STATE_FORMAT, "state": _encode(state, tensors, {})}
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(document))


def _unreadable(checkpoint: Path, path: Path, problem: str) -> CheckpointError:
    """The error for a bad file of ``checkpoint``, naming the run's previous checkpoint if any."""
    earlier = sorted(p for p in checkpoint.parent.glob("step_*") if p.name < checkpoint.name and (p / META_FILE).exists())
    hint = f"; the run's previous checkpoint is {earlier[-1]}" if earlier else ""
    return CheckpointError(f"checkpoint file {path}: {problem}{hint}")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def read_state(folder: Path) -> dict[str, Any]:
    """What :func:`write_state` wrote; a pickled, missing, truncated or corrupt state is
    a :class:`CheckpointError` (nothing in the files is ever executed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / STATE_JSON).exists() and (folder / PICKLED_STATE).exists():
        raise CheckpointError(
            f"checkpoint file {folder / PICKLED_STATE}: a pickled state (older epo checkpoint format) is refused, "
            "because loading a pickle can run arbitrary code"
        )
    try:
        document = json.loads((folder / STATE_JSON).read_text())
        state = document["state"] if document.get("format") == STATE_FORMAT else None
    except OSError as err:
        raise _unreadable(folder, folder / STATE_JSON, f"cannot be read ({_first_line(err)})") from None
    except (ValueError, KeyError, AttributeError) as err:
        raise _unreadable(folder, folder / STATE_JSON, f"truncated or corrupt ({_first_line(err)})") from None
    if state is None:
        raise _unreadable(folder, folder / STATE_JSON, f"not an epo trainer state of format {STATE_FORMAT}")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, SafetensorError) as err:
        raise _unreadable(folder, folder / STATE_TENSORS, f"truncated or corrupt ({_first_line(err)})") from None
    try:
        return _decode(state, tensors)
    except (KeyError, TypeError, ValueError) as err:
        problem = f"does not match {STATE_TENSORS} ({_first_line(err)})"
        raise _unreadable(folder, folder / STATE_JSON, problem) from None


def read_meta(folder: Path) -> dict[str, Any]:
    """The checkpoint's JSON summary (step, MLflow run id, entropy history)."""
    folder = Path(folder)
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except OSError as err:
        raise _unreadable(folder, path, f"cannot be read ({_first_line(err)})") from None
    except ValueError as err:
        raise _unreadable(folder, path, f"truncated or corrupt ({_first_line(err)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise _unreadable(folder, path, "expected a JSON object with an integer 'step'")
    return meta


def policy_source(folder: Path) -> Path:
    """The checkpoint's model folder: ``policy/`` (full weights), else a LoRA run's ``adapter/``."""
    folder = Path(folder)
    return folder / POLICY_DIR if (folder / POLICY_DIR).exists() or not (folder / ADAPTER_DIR).exists() else folder / ADAPTER_DIR


def load_policy(folder: Path, dtype: str, seed: int = 0):
    """The checkpoint's policy, from safetensors weights only (never a pickled .bin); a
    LoRA checkpoint without merged weights: its base (``seed``: the tiny test model's init)
    with the adapters merged in."""
    from transformers import AutoModelForCausalLM

    from epo_cli.models import load_causal_lm, use_grouped_attention_on_cpu

    use_grouped_attention_on_cpu()
    folder = Path(folder)
    source = policy_source(folder)
    try:
        if source.name == ADAPTER_DIR:
            return load_causal_lm(str(source), dtype, seed)
        return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), use_safetensors=True, local_files_only=True)
    except Exception as err:  # transformers and peft raise many kinds for a damaged model folder
        weights = source / ("adapter_model.safetensors" if source.name == ADAPTER_DIR else "model.safetensors")
        where = weights if weights.exists() else source
        raise _unreadable(folder, where, f"cannot be loaded ({_first_line(err)})") from None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "sampler": generator.get_state()}


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])


@dataclass
class ModelFolder:
    """One model folder of a checkpoint: ``name`` (``policy`` or ``adapter``), written by
    ``model.save_pretrained(folder, state_dict=state, **options)`` (``state``: e.g. weights
    gathered from shards; None: the model's own) with the tokenizer beside it."""

    name: str
    model: Any
    state: dict[str, torch.Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    root: Path,
    step: int,
    models: list[ModelFolder],
    tokenizer,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    spec_yaml: str,
    keep: int,
) -> Path:
    """Write ``root/step_NNNNNN`` (each model folder in transformers or peft format with
    safetensors weights, the trainer state via :func:`write_state`, a JSON summary, the
    spec) and keep the newest ``keep`` checkpoints. A crash mid-write leaves only a hidden
    temporary folder; earlier checkpoints are untouched."""
    target = root / f"step_{step:06d}"
    try:
        with atomic_folder(target) as staging:
            for part in models:
                part.model.save_pretrained(staging / part.name, state_dict=part.state, **part.options)
                tokenizer.save_pretrained(staging / part.name)
            write_state(staging, trainer_state)
            (staging / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
            (staging / "spec.yaml").write_text(spec_yaml)
    except Exception as err:
        problem = _no_space(err)
        if problem is None:
            raise
        weights = [part.state if part.state is not None else part.model.state_dict() for part in models]
        needed = sum(map(tensor_bytes, weights)) + tensor_bytes(trainer_state)
        free = shutil.disk_usage(root).free
        raise CheckpointSpaceError(
            f"checkpoint {target}: not written ({problem}): it needs about {_gigabytes(needed)}, "
            f"{_gigabytes(free)} free in {root}; earlier checkpoints are intact"
        ) from None
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _no_space(err: BaseException) -> str | None:
    """The OS's words when ``err`` is a write that ran out of room (an ``OSError``, or
    safetensors' error, which carries only the OS error number in its text), else None."""
    number = err.errno if isinstance(err, OSError) else None
    if number is None:
        found = re.search(r"os error (\d+)", str(err))
        number = int(found.group(1)) if found else None
    return os.strerror(number) if number in NO_SPACE_ERRNOS else None


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it mostly weighs)."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.2f} MB"


@contextlib.contextmanager
def atomic_folder(target: Path):
    """Yield a hidden staging folder beside ``target`` that replaces ``target`` when the
    block completes; an error while writing removes it and leaves ``target`` untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
