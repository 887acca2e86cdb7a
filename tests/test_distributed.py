"""Data parallel on CPU with gloo: 2 ranks must update exactly like 1 rank on the same
global batch (DDP and FSDP2), and `torchrun ... -m epo_cli train` must log one run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from epo_cli.batch import TurnBatch
from epo_cli.distributed import balanced_chunks, free_local_port, init_distributed, rank_slice, shutdown_distributed
from epo_cli.learner import Learner
from epo_cli.models import load_causal_lm
from epo_cli.spec import resolve_spec

TURNS_PER_EPISODE = [3, 2, 4, 1]  # uneven on purpose: ranks own 5 and 5 rows, in unequal micro-batches
STEPS = 3


def _spec(algo: str, strategy: str, extra: tuple[str, ...] = ()):
    # fp32 (the CPU scale runs bf16 autocast where the processor has bf16): ranks and one
    # process must agree to fp32 rounding.
    model = {"name": "tiny", "autocast": "none"}
    return resolve_spec(None, {"algo": {"name": algo}, "model": model, "distributed": {"strategy": strategy}}, [
        "scale=cpu", "rollout.tasks_per_step=2", "rollout.group_size=2", "train.steps=6", "optim.lr=1e-4",
        "optim.critic_lr=1e-4", "optim.mini_batch_size=6", "optim.micro_batch_size=2", *extra,
    ])


def _fixed_batch(step: int, vocab: int) -> TurnBatch:
    """Four episodes in two groups of two; tokens, rewards and sampler log-probs from a seed."""
    g = torch.Generator().manual_seed(100 + step)
    prompts, responses, episode_ids, turn_index, rewards, sample_logp = [], [], [], [], [], []
    for episode, turns in enumerate(TURNS_PER_EPISODE):
        for t in range(turns):
            prompt_len, response_len = int(torch.randint(5, 12, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
            prompts.append(torch.randint(3, vocab, (prompt_len,), generator=g).tolist())
            responses.append(torch.randint(3, vocab, (response_len,), generator=g).tolist())
            episode_ids.append(episode)
            turn_index.append(t)
            rewards.append(float(torch.randint(0, 2, (1,), generator=g)) if t == turns - 1 else -0.1 * float(torch.rand(1, generator=g) < 0.3))
            sample_logp.append(-torch.rand(response_len, generator=g) * 3)
    episode_ids = torch.tensor(episode_ids)
    return TurnBatch(prompts, responses, episode_ids, episode_ids // 2, torch.tensor(turn_index), torch.tensor(rewards), sample_logp)


def _train_on_fixed_batches(algo: str, strategy: str, extra: tuple[str, ...] = ()) -> dict:
    """Build a learner in this process (rank 0 of 1, or one of torchrun's ranks) and update
    it on the fixed batches; return what rank 0 sees."""
    dist = init_distributed(timeout_minutes=5)
    spec = _spec(algo, strategy, extra)
    learner = Learner(spec, pad_id=0, dist=dist)
    vocab = learner.policy.config.vocab_size
    episodes_per_rank = len(TURNS_PER_EPISODE) // dist.world_size
    betas = []
    for step in range(STEPS):
        batch = _fixed_batch(step, vocab)
        metrics = learner.learn(batch, batch.episode_ids // episodes_per_rank, step)
        betas.append(metrics["epo/beta"])
    state = learner.state_dict()
    result = {
        "policy": state["policy"],
        "state": state,
        "value_head": state["actor_value_head"],
        "history": learner.history.state_dict(),
        "betas": betas,
        "metrics": metrics,
        "sampler_weights": {k: v.detach().clone() for k, v in learner.policy_weights()},
    }
    shutdown_distributed(dist)
    return result


def assert_adam_close(got: torch.Tensor, expected: torch.Tensor, lr: float, msg: str) -> None:
    """Weights after AdamW steps on two ranks equal those of one process up to rounding,
    except that AdamW scales each coordinate's step to about ``lr`` whatever its gradient:
    a gradient at rounding level (summed in another order by the all-reduce) can move its
    coordinate by up to lr in either direction. So at most 1 in 100,000 coordinates may
    differ, and then by less than lr; a missing or doubled all-reduce moves most of them."""
    off = ~torch.isclose(got, expected, rtol=1e-4, atol=2e-6)
    assert int(off.sum()) <= max(1, off.numel() // 100_000), f"{msg}: {int(off.sum())} of {off.numel()} coordinates differ"
    assert float((got - expected).abs().max()) < lr, msg


def _rank_worker(rank: int, world: int, port: int, algo: str, strategy: str, out: str, extra: tuple[str, ...] = ()) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = _train_on_fixed_batches(algo, strategy, extra)
    if rank == 0:
        torch.save(result, out)


@pytest.mark.parametrize("algo,strategy", [("grpo+epo", "ddp"), ("ppo+epo", "ddp"), ("grpo+epo", "fsdp2"), ("ppo+epo", "fsdp2")])
def test_two_ranks_update_like_one(tmp_path, monkeypatch, algo, strategy):
    monkeypatch.setenv("WORLD_SIZE", "1")
    single = _train_on_fixed_batches(algo, strategy)
    out = tmp_path / "two.pt"
    mp.spawn(_rank_worker, args=(2, free_local_port(), algo, strategy, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)

    assert single["betas"] == two["betas"]
    for a, b in zip(single["history"]["step_means"], two["history"]["step_means"]):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(single["history"]["turn_means"], two["history"]["turn_means"]):
        assert a.keys() == b.keys()
        for turn in a:
            assert a[turn] == pytest.approx(b[turn], rel=1e-5)
    assert single["policy"].keys() == two["policy"].keys()
    start = load_causal_lm("tiny", seed=0).state_dict()
    assert any(not torch.equal(start[name], value) for name, value in single["policy"].items())  # it did learn
    for name, value in single["policy"].items():
        assert_adam_close(two["policy"][name], value, lr=1e-4, msg=name)
    for name, value in single["value_head"].items():
        assert_adam_close(two["value_head"][name], value, lr=1e-4, msg=name)
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "epo/smooth_penalty"):
        assert two["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-7), key
    # The consolidated checkpoint state of 2 ranks resumes in 1 process, optimizer included.
    resumed = Learner(_spec(algo, strategy), pad_id=0)
    resumed.load_state_dict(two["state"], two["policy"])
    single_optim, resumed_optim = single["state"]["optimizers"][0]["state"], resumed.state_dict()["optimizers"][0]["state"]
    assert single_optim.keys() == resumed_optim.keys()
    for name in single_optim:
        torch.testing.assert_close(resumed_optim[name]["exp_avg_sq"], single_optim[name]["exp_avg_sq"], rtol=1e-3, atol=1e-12)
    assert resumed.history.step_means == two["history"]["step_means"]
    # What a sampler with its own weights receives after an update is the trained policy.
    assert two["sampler_weights"].keys() == two["policy"].keys()
    for name, value in two["sampler_weights"].items():
        torch.testing.assert_close(value, two["policy"][name], msg=name)


def test_groups_never_straddle_ranks_and_ranks_run_equal_micro_batches():
    from epo_cli.distributed import DistContext

    assert list(rank_slice(8, DistContext(rank=1, world_size=4))) == [2, 3]
    with pytest.raises(ValueError, match="tasks_per_step=6 must be divisible by the number of processes \\(4\\)"):
        rank_slice(6, DistContext(rank=0, world_size=4))
    assert balanced_chunks([[[0, 1], [2]], [[3, 4]]], 1) == [[3, 4], None]
    assert balanced_chunks([[[0, 1], [2]], [[3, 4]]], 0) == [[0, 1], [2]]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_processes_train_scienceworld_into_one_run(tmp_path, strategy):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_local_port()),
        "-m", "epo_cli", "train", "--env", "scienceworld", "--algo", "grpo+epo", "--model", "tiny", "--steps", "2",
        "--strategy", strategy, "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/ckpt", "--set", "env.max_turns=2",
        "--set", "eval.every=2", "--set", "eval.episodes=2",
        "--set", "rollout.max_response_tokens=12", "--set", "rollout.tasks_per_step=2", "--set", "env.workers=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"2 processes ({strategy})" in done.stdout
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["epo.world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "actor/entropy")]
    assert steps == [0, 1]
    # 2 tasks x group of 2 = 4 episodes a step, half played by each rank, all logged.
    assert run.data.metrics["train/episode_turns"] > 0
    assert run.data.metrics["eval/iid/episodes"] == 2  # evaluation split across ranks, gathered
    episodes = Path(client.download_artifacts(run.info.run_id, "episodes/step_00001.jsonl", str(tmp_path))).read_text()
    assert len(episodes.splitlines()) == 4
    checkpoints = list((tmp_path / "ckpt" / run.info.run_id).glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_000002"]
    saved = load_causal_lm(str(checkpoints[0] / "policy")).state_dict()  # consolidated, loadable as one model
    assert saved.keys() == load_causal_lm("tiny").state_dict().keys()


def test_commands_other_than_train_refuse_torchrun(monkeypatch):
    from typer.testing import CliRunner

    from epo_cli.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["ablate", "smoothing"])
    assert result.exit_code == 2
    assert "epo ablate runs in one process; only `epo train` runs under torchrun" in result.output


def test_kl_to_the_frozen_start_policy_is_zero_until_the_policy_moves(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    spec = _spec("grpo+epo", "ddp").model_copy(deep=True)
    spec.algo.kl_coef = 0.5
    spec.optim.mini_batch_size = 16  # one mini-batch: the policy equals the reference during step 0
    learner = Learner(spec, pad_id=0)
    vocab = learner.policy.config.vocab_size
    owner = torch.zeros(sum(TURNS_PER_EPISODE), dtype=torch.long)
    first = learner.learn(_fixed_batch(0, vocab), owner, 0)
    second = learner.learn(_fixed_batch(1, vocab), owner, 1)
    assert first["actor/kl_ref"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < second["actor/kl_ref"] < 1
