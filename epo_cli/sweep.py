"""Sweep files: a base spec, arms as spec overrides, and seeds, run by ``epo ablate --sweep
FILE`` as one MLflow parent run with a child per (arm, seed), like an ablation.

```yaml
name: epo-study
base: cpu/alfworld_pick_conversation_grpo_epo.yaml   # relative to this file
seeds: [0, 1, 2]
set: [eval.every=8]                                 # every arm
arms:
  - {name: ppo, set: [algo.name=ppo]}
  - {name: ppo+epo, set: [algo.name=ppo+epo]}
  - {name: ppo+epo-lambda0.01, set: [algo.name=ppo+epo, epo.entropy_coef=0.01], note: outside the paper's settings}
  - {name: ppo-extra, set: [algo.name=ppo], seeds: [3, 4]}        # an arm's own seeds
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from epo_cli.spec import ExperimentSpec, SpecError, deep_merge, format_validation_error, load_yaml, parse_override, resolve_spec


def _distinct(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"expected distinct seeds, got {seeds}")
    return seeds


class SweepArm(BaseModel):
    """One arm: a name (its child runs' variant tag) and its spec overrides."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="Label of the arm's runs.")
    set: list[str] = Field(default_factory=list, description="Overrides FIELD.PATH=VALUE, as `--set`, after the sweep's.")
    note: str = Field("", description="Shown beside the arm, e.g. 'outside the paper's settings'.")
    seeds: list[int] | None = Field(None, min_length=1, description="This arm's seeds (default: the sweep's).")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        return seeds if seeds is None else _distinct(seeds)


class SweepSpec(BaseModel):
    """A base spec, overrides shared by every arm, the arms and the seeds."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="The sweep's name (its parent run).")
    base: Path | None = Field(None, description="Base experiment spec, relative to the sweep file (default: none).")
    seeds: list[int] = Field(min_length=1, description="train.seed of each arm's runs (unless the arm names its own).")
    set: list[str] = Field(default_factory=list, description="Overrides for every arm, FIELD.PATH=VALUE.")
    arms: list[SweepArm] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        return _distinct(seeds)

    @field_validator("arms")
    @classmethod
    def _distinct_names(cls, arms: list[SweepArm]) -> list[SweepArm]:
        names = [arm.name for arm in arms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"arm names must be distinct; repeated: {', '.join(repeated)}")
        return arms


def _one_line(message: object) -> str:
    return str(message).replace("\n", "; ")


def load_sweep(path: Path) -> SweepSpec:
    """The sweep file, validated; its ``base`` made absolute. Errors name the file and field."""
    try:
        sweep = SweepSpec.model_validate(load_yaml(path))
    except ValidationError as err:
        raise SpecError(_one_line(format_validation_error(err, f"sweep file {path}"))) from None
    except SpecError as err:
        raise SpecError(str(err).replace("spec file", "sweep file", 1)) from None
    if sweep.base is not None:
        sweep.base = (Path(path).parent / sweep.base).resolve()
        if not sweep.base.is_file():
            raise SpecError(f"sweep file {path}: base: {sweep.base} is not a file")
    return sweep


def sweep_specs(sweep: SweepSpec, flags: dict[str, Any], overrides: list[str]) -> dict[tuple[str, int], ExperimentSpec]:
    """Every (arm, seed) child's resolved spec, in running order (each seed through every
    arm), all validated before any run starts. Layers, later wins: ``base`` -> the sweep's
    ``set`` -> the arm's ``set`` -> command-line flags -> the command line's ``--set`` ->
    the seed."""
    def resolved(texts: list[str], seed_overrides: list[str]) -> ExperimentSpec:
        layer: dict[str, Any] = {}
        for text in texts:
            layer = deep_merge(layer, parse_override(text))
        return resolve_spec(sweep.base, deep_merge(layer, flags), [*overrides, *seed_overrides])

    specs = {}
    for seed in sweep_seeds(sweep):  # seed by seed: a stopped sweep is balanced across arms
        for arm in (a for a in sweep.arms if seed in (a.seeds or sweep.seeds)):
            try:
                specs[(arm.name, seed)] = resolved([*sweep.set, *arm.set], [f"train.seed={seed}"])
            except SpecError as err:
                raise SpecError(f"sweep {sweep.name}, {_culprit(resolved, sweep, arm)}: {_one_line(err)}") from None
    return specs


def sweep_seeds(sweep: SweepSpec) -> list[int]:
    """Every seed some arm runs: the sweep's, then the arms' own, in order of appearance."""
    candidates = dict.fromkeys([*sweep.seeds, *(seed for arm in sweep.arms for seed in arm.seeds or [])])
    return [seed for seed in candidates if any(seed in (arm.seeds or sweep.seeds) for arm in sweep.arms)]


def _culprit(resolved, sweep: SweepSpec, arm: SweepArm) -> str:
    """Whom an arm's spec error belongs to: the settings every arm shares when the spec
    fails without the arm's own set too, else the arm."""
    try:
        resolved(sweep.set, [])
    except SpecError:
        return "settings shared by every arm (the sweep's set, the command line)"
    return f"arm {arm.name}"
