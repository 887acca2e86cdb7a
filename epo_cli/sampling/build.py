"""The sampler a spec names (``rollout.backend``) and its weight dtype."""

from __future__ import annotations

import torch

from epo_cli.sampling.base import Sampler
from epo_cli.sampling.transformers import TransformersSampler


def sampler_dtype(spec) -> str:
    """The sampler's weight dtype: ``rollout.dtype``, else the policy's (vLLM under bf16
    autocast: bfloat16)."""
    if spec.rollout.dtype is not None:
        return spec.rollout.dtype
    return "bfloat16" if spec.rollout.backend == "vllm" and spec.model.autocast == "bf16" else spec.model.dtype


def build_sampler(spec, policy, tokenizer, generator: torch.Generator, model_dir=None) -> Sampler:
    """The sampler ``rollout.backend`` names: transformers on ``policy``, or a vLLM engine
    started from ``model_dir`` (a transformers folder; its weights are replaced through
    ``update_weights``)."""
    if spec.rollout.backend == "vllm":
        from epo_cli.sampling.vllm import VLLMSampler

        options = spec.rollout.vllm
        return VLLMSampler(
            model_dir, generator, spec.rollout.max_prompt_tokens + spec.rollout.max_response_tokens,
            sampler_dtype(spec),
            options.gpu_memory_utilization, options.cpu_kv_cache_gb, options.enforce_eager, spec.train.seed,
        )
    return TransformersSampler(policy, tokenizer, spec.rollout.generation_batch_size, generator, spec.model.autocast,
                               spec.rollout.fast_forward,
                               prefix_cache=spec.rollout.prompt_format == "conversation" and spec.rollout.prefix_cache)
