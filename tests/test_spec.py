from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from epo_cli.facts import facts_here
from epo_cli.presets import CPU_SCALE, VARIANT_OVERRIDES, VARIANTS
from epo_cli.spec import (
    SpecError,
    parse_override,
    resolve_spec,
    saved_spec,
    spec_to_yaml,
)

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_scale_is_small_and_says_so():
    spec = resolve_spec(flags={"scale": "cpu"})
    assert spec.scale == "cpu"
    assert spec.env.max_turns == CPU_SCALE["env"]["max_turns"]
    assert spec.train.steps == CPU_SCALE["train"]["steps"]
    assert spec.episodes_per_step == 4


@pytest.mark.parametrize("native", [True, False])
def test_cpu_scale_uses_bf16_only_where_the_processor_has_bf16(native):
    facts = replace(facts_here(), native_bf16=native)
    spec = resolve_spec(flags={"scale": "cpu", "env": {"name": "alfworld"}}, facts=facts)
    expected = ("bfloat16", 2.0, "bf16") if native else (None, None, "none")
    assert (spec.rollout.dtype, spec.algo.tis_cap, spec.model.autocast) == expected
    assert spec.model.dtype == "float32"  # autocast: the weights and AdamW state stay fp32
    toy = resolve_spec(flags={"scale": "cpu", "env": {"name": "toy"}}, facts=facts)
    assert (toy.rollout.dtype, toy.algo.tis_cap, toy.model.autocast) == (None, None, "none")  # the toy: all fp32
    paper = resolve_spec(flags={"scale": "paper"}, facts=facts)
    assert (paper.rollout.dtype, paper.model.autocast) == (None, "none")


def test_a_saved_spec_is_taken_whole_and_new_fields_keep_what_the_run_did(tmp_path):
    bf16_machine = replace(facts_here(), native_bf16=True)
    spec = resolve_spec(flags={"scale": "cpu", "env": {"name": "alfworld"}}, facts=bf16_machine)
    saved = tmp_path / "spec.yaml"
    saved.write_text(spec_to_yaml(spec))
    assert saved_spec(saved) == spec
    assert saved_spec(saved, {"tracking": {"uri": "sqlite:///x.db"}}, ["eval.episodes=3"]).eval.episodes == 3
    # A run saved before rollout.dtype existed sampled with its own weights: no preset fills the field in.
    old = yaml.safe_load(saved.read_text())
    del old["rollout"]["dtype"], old["algo"]["tis_cap"]
    saved.write_text(yaml.safe_dump(old))
    assert (saved_spec(saved).rollout.dtype, saved_spec(saved).algo.tis_cap) == (None, None)
    assert resolve_spec(saved, facts=bf16_machine).rollout.dtype == "bfloat16"  # what re-resolving through the presets would do
    with pytest.raises(SpecError, match=r"spec\.yaml: rollout\.temperature"):
        saved_spec(saved, overrides=["rollout.temperature=-1"])


def test_paper_scale_uses_the_paper_settings():
    spec = resolve_spec(flags={"scale": "paper"})
    assert (spec.env.max_turns, spec.train.steps, spec.optim.lr) == (30, 125, 3e-6)
    assert (spec.epo.entropy_coef, spec.epo.smoothing.alpha, spec.epo.weighting.gamma) == (0.001, 0.05, 3.0)
    grpo = resolve_spec(flags={"scale": "paper", "algo": {"name": "grpo+epo"}})
    assert (grpo.rollout.group_size, grpo.optim.lr, grpo.optim.mini_batch_size) == (8, 5e-6, 128)
    alf = resolve_spec(flags={"scale": "paper", "env": {"name": "alfworld"}})
    assert (alf.env.max_turns, alf.train.steps, alf.epo.smoothing.alpha) == (50, 150, 0.1)


def test_plain_algorithms_have_no_entropy_terms_unless_set():
    spec = resolve_spec(flags={"algo": {"name": "ppo"}})
    assert spec.epo.entropy_coef == 0.0 and not spec.epo.smoothing.enabled
    spec = resolve_spec(flags={"algo": {"name": "ppo"}}, overrides=["epo.entropy_coef=0.01"])
    assert spec.epo.entropy_coef == 0.01


def test_variants_change_the_named_fields():
    assert not resolve_spec(flags={"algo": {"variant": "epo-base"}}).epo.smoothing.enabled
    assert not resolve_spec(flags={"algo": {"variant": "no-dw"}}).epo.weighting.dynamic
    assert resolve_spec(flags={"algo": {"variant": "indicator"}}).epo.smoothing.form == "indicator"
    assert resolve_spec(flags={"algo": {"variant": "ea"}}).epo.entropy_advantage.enabled


def test_ea_alone_on_plain_algorithms_and_entropy_variants_need_an_entropy_bonus():
    ea = resolve_spec(flags={"algo": {"name": "grpo", "variant": "ea"}}).epo
    assert ea.entropy_advantage.enabled and ea.entropy_coef == 0.0 and not ea.smoothing.enabled  # the EA baseline
    ea_epo = resolve_spec(flags={"algo": {"name": "grpo+epo", "variant": "ea"}}).epo
    assert ea_epo.entropy_advantage.enabled and ea_epo.entropy_coef == 0.001 and not ea_epo.smoothing.enabled
    with pytest.raises(SpecError, match="algo.variant decay changes the entropy bonus, but epo.entropy_coef is 0 "
                                         r"\(grpo has none\): use grpo\+epo or set epo.entropy_coef"):
        resolve_spec(flags={"algo": {"name": "grpo", "variant": "decay"}})
    decay = resolve_spec(flags={"algo": {"name": "grpo", "variant": "decay"}}, overrides=["epo.entropy_coef=0.01"]).epo
    assert (decay.entropy_coef, decay.decay.turn_decay, decay.decay.step_schedule) == (0.01, 0.9, "linear")


def test_overrides_apply_last_and_parse_yaml_values():
    spec = resolve_spec(flags={"train": {"steps": 7}}, overrides=["train.steps=9", "epo.smoothing.window=5", "tracking.run_name=abc"])
    assert spec.train.steps == 9 and spec.epo.smoothing.window == 5 and spec.tracking.run_name == "abc"
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}


def test_spec_file_layer(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"algo": {"name": "grpo+epo"}, "rollout": {"group_size": 4}}))
    spec = resolve_spec(path, flags={"scale": "cpu"})
    assert spec.algo.name == "grpo+epo" and spec.rollout.group_size == 4


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("foo.bar=1", "foo: unknown field"),
        ("epo.smoothing.kappa_l=3", "kappa_l (3.0) must not exceed kappa_r"),
        ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
        ("env.max_turns=0", "env.max_turns"),
        ("algo.name=sac", "algo.name: unknown algorithm 'sac'; expected one of ppo, ppo+epo, grpo"),
        ("rollout.temperature=hot", "rollout.temperature"),
        ("algo.dual_clip_c=1", "algo.dual_clip_c: Input should be greater than 1"),
    ],
)
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(SpecError) as err:
        resolve_spec(overrides=[override])
    assert fragment in str(err.value)


def test_dual_clip_is_on_by_default_and_null_turns_it_off():
    assert resolve_spec().algo.dual_clip_c == 3.0
    assert resolve_spec(overrides=["algo.dual_clip_c=null"]).algo.dual_clip_c is None


def test_grpo_needs_groups():
    with pytest.raises(SpecError, match="group_size must be >= 2"):
        resolve_spec(flags={"algo": {"name": "grpo"}}, overrides=["rollout.group_size=1"])


def test_group_filtering_is_for_group_estimators_only():
    assert resolve_spec(flags={"algo": {"name": "grpo+epo"}}, overrides=["algo.filter_groups=true"]).algo.filter_groups
    with pytest.raises(SpecError, match="algo.filter_groups needs a group-based estimator"):
        resolve_spec(flags={"algo": {"name": "ppo+epo"}}, overrides=["algo.filter_groups=true"])
    with pytest.raises(SpecError, match="filter_max_rounds"):
        resolve_spec(overrides=["algo.filter_max_rounds=0"])


def test_term_grad_norms_refuse_fsdp2():
    assert resolve_spec(overrides=["tracking.term_grad_norms=true"]).tracking.term_grad_norms
    with pytest.raises(SpecError, match="tracking.term_grad_norms needs distributed.strategy ddp"):
        resolve_spec(overrides=["tracking.term_grad_norms=true", "distributed.strategy=fsdp2"])


def test_bad_files(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        resolve_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        resolve_spec(bad)


def test_every_preset_in_experiments_validates():
    sweeps = ROOT / "experiments" / "sweeps"  # sweep files, not specs: tests/test_sweep.py
    presets = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if sweeps not in p.parents)
    assert presets, "no presets found"
    for path in presets:
        spec = resolve_spec(path)
        assert spec.algo.dual_clip_c == 3.0, path
        stem = path.stem.split("_", 1)[1] if path.parent.name == "cpu" else path.stem
        assert stem.replace("_", "+").endswith(spec.algo.name), path  # e.g. cpu/alfworld_pick_grpo_epo


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["scale", "model", "env", "algo", "epo", "train", "bogus"]),
                       st.one_of(st.integers(), st.text(max_size=5), st.none(), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)),
                       max_size=3))
def test_loader_either_validates_or_raises_a_spec_error(data):
    try:
        resolve_spec(flags=data)
    except SpecError as err:
        assert str(err).startswith("spec: ")


@pytest.mark.parametrize("env, model, turns, steps, alpha", [
    ("scienceworld", "Qwen/Qwen2.5-7B-Instruct", 30, 125, 0.05),
    ("alfworld", "Qwen/Qwen2.5-3B-Instruct", 50, 150, 0.1),
])
def test_paper_presets_hold_the_paper_settings(env, model, turns, steps, alpha):
    for name in ("ppo", "ppo_epo", "grpo", "grpo_epo"):
        spec = resolve_spec(ROOT / "experiments" / env / f"{name}.yaml")
        assert (spec.scale, spec.model.name, spec.env.max_turns, spec.train.steps) == ("paper", model, turns, steps)
        assert (spec.rollout.max_prompt_tokens, spec.rollout.max_response_tokens) == (2048, 512)
        assert (spec.rollout.temperature, spec.eval.temperature, spec.eval.every) == (1.0, 0.4, 5)
        assert spec.algo.dual_clip_c == 3.0  # the EPO reference code's clip_ratio_c in every run
        assert spec.rollout.group_size == (8 if name.startswith("grpo") else 1)
        if name.endswith("epo"):
            smoothing = spec.epo.smoothing
            assert (spec.epo.entropy_coef, smoothing.kappa_l, smoothing.kappa_r, smoothing.alpha) == (0.001, 0.0, 2.0, alpha)
            assert spec.epo.weighting.dynamic and spec.epo.weighting.gamma == 3.0 and smoothing.enabled
        else:
            assert spec.epo.entropy_coef == 0.0 and not spec.epo.smoothing.enabled
    lrs = {name: resolve_spec(ROOT / "experiments" / env / f"{name}.yaml").optim.lr for name in ("ppo", "grpo")}
    assert lrs == ({"ppo": 3e-6, "grpo": 5e-6} if env == "scienceworld" else {"ppo": 5e-6, "grpo": 5e-6})


@pytest.mark.parametrize("env", ["scienceworld", "alfworld"])
@pytest.mark.parametrize("algo", ["ppo", "ppo+epo", "grpo", "grpo+epo"])
def test_flags_resolve_to_the_same_spec_as_the_preset_file(env, algo):
    preset = resolve_spec(ROOT / "experiments" / env / f"{algo.replace('+', '_')}.yaml")
    # The files' machine choices (model, workers, eval size) passed as flags; the rest
    # (batch sizes, lr, turns, steps, EPO terms) must come out of the built-in layers.
    flags = {"scale": "paper", "env": {"name": env, "workers": preset.env.workers}, "algo": {"name": algo},
             "model": preset.model.model_dump(), "eval": {"episodes": preset.eval.episodes}}
    assert resolve_spec(flags=flags).model_dump() == preset.model_dump()
    if env == "alfworld":  # the paper's ALFWorld batch sizes, for GRPO too
        assert (preset.optim.mini_batch_size, preset.optim.micro_batch_size) == (256, 32)


def test_every_field_is_described_and_the_commented_yaml_reads_back():
    spec = resolve_spec(flags={"env": {"name": "alfworld", "task_types": ["pick_and_place_simple"]}}, overrides=["algo.dual_clip_c=null"])
    text = spec_to_yaml(spec, comments=True)
    assert yaml.safe_load(text) == spec.model_dump(mode="json")
    lines = text.splitlines()
    assert all("  # " in line for line in lines), [line for line in lines if "  # " not in line]
    assert "  dual_clip_c: null  # Dual-clip PPO" in text
    assert "    alpha: 0.1  # Penalty scale alpha (Eq. 4; paper 0.05 ScienceWorld, 0.1 ALFWorld)." in text


def test_variants_are_named_once():
    assert tuple(VARIANT_OVERRIDES) == VARIANTS



def test_the_advantage_estimator_defaults_by_algorithm_and_is_checked_by_name():
    assert resolve_spec(flags={"algo": {"name": "ppo+epo"}}).algo.advantage == "gae"
    assert resolve_spec(flags={"algo": {"name": "grpo"}}).algo.advantage == "grpo"
    # PPO's clipped loss with group advantages: no critic, and groups are needed.
    assert resolve_spec(flags={"algo": {"name": "ppo"}}, overrides=["algo.advantage=grpo", "rollout.group_size=4"]).algo.estimator.needs_critic is False
    with pytest.raises(SpecError, match="group_size must be >= 2 for grpo"):
        resolve_spec(flags={"algo": {"name": "ppo"}}, overrides=["algo.advantage=grpo"])
    with pytest.raises(SpecError, match=r"algo.advantage: unknown estimator 'rloo2'; expected one of gae, grpo, rloo, gigpo, reinforce\+\+"):
        resolve_spec(overrides=["algo.advantage=rloo2"])


@pytest.mark.parametrize("name", ["rloo", "gigpo+epo", "reinforce++"])
def test_each_critic_free_algorithm_names_its_estimator_and_takes_grpos_sizes(name):
    spec = resolve_spec(flags={"algo": {"name": name}})
    grpo = resolve_spec(flags={"algo": {"name": "grpo" + ("+epo" if name.endswith("+epo") else "")}})
    assert spec.algo.advantage == name.removesuffix("+epo") and spec.algo.family == "grpo"
    assert spec.algo.uses_epo == name.endswith("+epo") and not spec.algo.estimator.needs_critic
    assert (spec.rollout.group_size, spec.optim.lr, spec.epo.entropy_coef) == (grpo.rollout.group_size, grpo.optim.lr,
                                                                                grpo.epo.entropy_coef)
