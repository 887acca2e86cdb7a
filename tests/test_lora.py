"""LoRA adapters (model.lora): only the adapters train, the KL reference is the start
policy with the adapters off, merged weights score as the adapted model, ranks agree,
checkpoints resume and evaluate, bad settings are named."""

import json

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import TURNS_PER_EPISODE, _fixed_batch, _rank_worker, _spec, _train_on_fixed_batches
from typer.testing import CliRunner

from epo_cli.cli import app
from epo_cli.distributed import free_local_port
from epo_cli.learner import Learner
from epo_cli.lora import AdaptersOff, LoraError, add_adapters, merged_weights, read_adapter
from epo_cli.models import load_causal_lm
from epo_cli.spec import LoraSpec

LORA = ("model.lora.rank=4",)
runner = CliRunner()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def _adapted(rank: int = 4, alpha: float | None = None):
    """The tiny model with adapters whose B is random (fresh B is 0: no change at all)."""
    peft_model = add_adapters(load_causal_lm("tiny"), LoraSpec(rank=rank, alpha=alpha), "tiny")
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return peft_model


@pytest.mark.parametrize("rank,alpha", [(4, None), (2, 3.0)])
def test_merged_weights_score_as_the_adapted_model(rank, alpha):
    peft_model = _adapted(rank, alpha)
    model = peft_model.get_base_model()
    ids = _ids(model.config.vocab_size)
    adapted = model(ids).logits
    plain = load_causal_lm("tiny")
    assert not torch.allclose(plain(ids).logits, adapted, atol=1e-3)  # the adapters do change the scores
    scale = (alpha or 2 * rank) / rank
    plain.load_state_dict(merged_weights(model.state_dict(), scale))  # strict: every original name, nothing else
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_with_the_adapters_off_the_model_is_the_start_model():
    peft_model = _adapted()
    model = peft_model.get_base_model()
    ids = _ids(model.config.vocab_size)
    start = load_causal_lm("tiny")(ids).logits
    reference = AdaptersOff(lambda x: model(x).logits, peft_model)
    torch.testing.assert_close(reference(ids), start, rtol=0, atol=0)
    assert not torch.allclose(model(ids).logits, start, atol=1e-3)  # switched back on afterwards


def test_only_the_adapters_train_and_the_kl_reference_stays_the_start_policy(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    spec = _spec("grpo+epo", "ddp", (*LORA, "algo.kl_coef=0.5", "optim.mini_batch_size=16", "optim.lr=1e-2"))
    learner = Learner(spec, pad_id=0)
    trained = [p for group in learner.optimizers[0].param_groups for p in group["params"]]
    adapters = [p for name, p in learner.policy.named_parameters() if "lora_" in name]
    assert {id(p) for p in trained} == {id(p) for p in adapters} and len(adapters) == 2 * 7 * 2  # A, B x 7 x 2 layers
    start = load_causal_lm("tiny").state_dict()
    vocab = learner.policy.config.vocab_size
    owner = torch.zeros(sum(TURNS_PER_EPISODE), dtype=torch.long)
    first = learner.learn(_fixed_batch(0, vocab), owner, 0)
    second = learner.learn(_fixed_batch(1, vocab), owner, 1)
    assert first["actor/kl_ref"] == pytest.approx(0.0, abs=1e-9)  # adapters start at B = 0: policy = reference
    assert 0 < second["actor/kl_ref"] < 1
    for name, value in learner.policy.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(value, start[name.replace(".base_layer", "")]), name  # the base never moves
    assert set(learner.state_dict()["policy"]) == {n for n, _ in learner.policy.named_parameters() if "lora_" in n}


@pytest.mark.slow
@pytest.mark.parametrize("algo,strategy", [("grpo+epo", "ddp"), ("ppo+epo", "fsdp2")])
def test_two_ranks_update_lora_like_one(tmp_path, monkeypatch, algo, strategy):
    monkeypatch.setenv("WORLD_SIZE", "1")
    single = _train_on_fixed_batches(algo, strategy, LORA)
    out = tmp_path / "two.pt"
    mp.spawn(_rank_worker, args=(2, free_local_port(), algo, strategy, str(out), LORA), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    assert single["betas"] == two["betas"]
    assert single["policy"].keys() == two["policy"].keys() and all(".lora_" in k for k in single["policy"])
    assert any(float(v.abs().max()) > 0 for k, v in single["policy"].items() if "lora_B" in k)  # it did learn
    for name, value in single["policy"].items():
        torch.testing.assert_close(two["policy"][name], value, rtol=1e-4, atol=2e-6, msg=name)
    # A sampler with its own weights gets the plain model's names, adapters merged in.
    assert two["sampler_weights"].keys() == load_causal_lm("tiny").state_dict().keys()
    for name, value in single["sampler_weights"].items():
        torch.testing.assert_close(two["sampler_weights"][name], value, rtol=1e-4, atol=2e-6, msg=name)


def _train_args(tmp_path, *extra):
    return ["train", "--env", "toy", "--algo", "grpo+epo", "--model", "tiny", "--steps", "2", "--seed", "3",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--set", f"checkpoint.dir={tmp_path}/ckpt",
            "--set", "checkpoint.every=1", "--set", "model.lora.rank=4", "--set", "optim.lr=1e-2", *extra]


@pytest.mark.slow
def test_a_lora_checkpoint_holds_the_adapters_and_evaluates(tmp_path):
    result = runner.invoke(app, _train_args(tmp_path, "--set", "model.lora.save_merged=true"))
    assert result.exit_code == 0, result.output
    (checkpoint,) = (tmp_path / "ckpt").glob("*/step_000002")
    adapter = checkpoint / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "tiny"
    weights = read_adapter(adapter)
    assert weights and all(".lora_" in k for k in weights)
    size = sum(p.stat().st_size for p in adapter.glob("*.safetensors"))
    assert size < sum(p.stat().st_size for p in (checkpoint / "policy").glob("*.safetensors")) / 10
    # The adapter folder (base + adapters, merged on load) and the merged folder are one model.
    ids = _ids(1000)
    from_adapter = load_causal_lm(str(adapter), seed=3)(ids).logits
    from_merged = load_causal_lm(str(checkpoint / "policy"))(ids).logits
    torch.testing.assert_close(from_adapter, from_merged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(from_adapter, load_causal_lm("tiny", seed=3)(ids).logits, atol=1e-4)  # the adapters moved

    for target in (checkpoint, adapter):
        if target == adapter:
            args = ["eval", "--model", str(adapter), "--env", "toy", "--episodes", "4", "--split", "iid"]
        else:
            args = ["eval", str(checkpoint), "--episodes", "4", "--split", "iid"]
        result = runner.invoke(app, [*args, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
        assert result.exit_code == 0, result.output
        assert "iid" in result.output


@pytest.mark.parametrize("setting,expected", [
    ("model.lora.rank=0", "model.lora.rank: Input should be greater than or equal to 1"),
    ("model.lora.dropout=1.5", "model.lora.dropout"),
    ("model.lora.target_modules=[q_proj,qkv]", "model.lora.target_modules: 'qkv' matches no linear layer of model 'tiny'"),
    ("model.lora.target_modules=[lm_head]", "model.lora.target_modules: 'lm_head' matches no linear layer"),
])
def test_bad_lora_settings_are_one_line_errors_naming_the_field(tmp_path, setting, expected):
    result = runner.invoke(app, _train_args(tmp_path, "--set", setting))  # the later --set wins
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert not (tmp_path / "ckpt").exists()  # nothing written


def test_an_unknown_target_module_names_the_field_and_the_layers_there_are():
    with pytest.raises(LoraError, match="its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        add_adapters(load_causal_lm("tiny"), LoraSpec(rank=2, target_modules=["attn"]), "tiny")


@pytest.mark.slow
def test_grpo_epo_learns_the_toy_training_lora_adapters_only():
    from test_toy import _learn

    rewards = _learn("toy", "grpo+epo", 60, ["model.lora.rank=8"])
    assert rewards[0] <= 0.5
    assert sum(rewards[-10:]) / 10 >= 0.5, [round(r, 2) for r in rewards]
