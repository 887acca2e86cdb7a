"""LoRA adapters (``model.lora``) through peft: build, score without, merge, save, load.

The adapters are injected into the transformers model in place, so everything that
scores or samples the policy (``forward_turns``, the samplers) sees an ordinary causal LM
whose linear layers add ``(alpha / r) B A x`` (Hu et al. 2021, eq. 3). The peft wrapper is
kept beside it for what only it can do: switch the adapters off (the KL reference, the
start policy, with no second copy of the weights) and write the adapter files.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn


class LoraError(ValueError):
    """Bad LoRA settings or an unreadable adapter folder; the message is one line naming it."""


ADAPTER_CONFIG = "adapter_config.json"
# The one adapter name peft gives a model it wraps; its weights are named after it.
ADAPTER_NAME = "default"


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the decoder's linear layers (the names ``target_modules``
    may match; not the LM head, which the scoring path applies as a plain weight)."""
    decoder = model.base_model.named_modules()
    return sorted({name.rsplit(".", 1)[-1] for name, module in decoder if isinstance(module, nn.Linear)})


def add_adapters(model: nn.Module, lora, model_name: str, seed: int = 0):
    """Wrap ``model`` with fresh LoRA adapters (``lora``: the spec's ``model.lora``; A drawn
    from ``seed``, B = 0); only the adapters train. Returns the peft model;
    ``.get_base_model()`` is ``model`` itself, now with adapter layers. An unknown target
    module is a one-line error naming the field."""
    from peft import LoraConfig, get_peft_model

    known = linear_layer_names(model)
    unknown = [name for name in lora.target_modules if name not in known]
    if unknown:
        raise LoraError(
            f"model.lora.target_modules: {', '.join(map(repr, unknown))} matches no linear layer of "
            f"model {model_name!r}; its linear layers are {', '.join(known)}"
        )
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with warnings.catch_warnings(), torch.random.fork_rng(devices=cuda):
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks a deprecated gradient-checkpointing question
        torch.manual_seed(seed)  # the same adapters in every process and every run of this seed
        peft_model = get_peft_model(model, config)
    # The name a later load resolves (not the cache folder transformers saw).
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = model_name
    return peft_model


class AdaptersOff:
    """Calls a scorer with the adapters switched off: the start policy, for the KL term."""

    def __init__(self, scorer, peft_model):
        self.scorer = scorer
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.scorer(*args, **kwargs)


def merged_weights(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The plain model's weights from an adapted model's state dict: every adapted
    ``W`` becomes ``W + scale * B @ A`` under its original name, adapter tensors dropped."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.{ADAPTER_NAME}.weight"].float()
                b = state[f"{prefix}.lora_B.{ADAPTER_NAME}.weight"].float()
                value = (value.float() + scale * (b @ a)).to(value.dtype)
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged


def adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of an adapted model's state dict (what a LoRA run trains)."""
    return {key: value for key, value in state.items() if ".lora_" in key}


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter folder's tensors (peft's ``save_pretrained`` of a state dict whose names
    carry peft's ``base_model.model.`` prefix) under the names :func:`adapter_weights`
    gives them."""
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(folder), device="cpu")
    renamed = {}
    for key, value in weights.items():
        stem, _, leaf = key.removeprefix("base_model.model.").rpartition(".")
        renamed[f"{stem}.{ADAPTER_NAME}.{leaf}"] = value
    return renamed


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def adapter_base(folder: Path) -> str:
    """The base model name an adapter folder was trained on."""
    try:
        return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as err:
        raise LoraError(f"adapter folder {folder}: unreadable {ADAPTER_CONFIG} ({err}); expected peft's adapter config") from None


def load_merged(folder: Path, base: nn.Module) -> nn.Module:
    """``base`` with the adapters of ``folder`` merged into its weights (a plain model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
