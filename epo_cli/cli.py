"""The ``epo`` command line: parse, call, print. Every flag maps onto a spec field."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, get_args, get_origin

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from epo_cli.envs.registry import ENVS
from epo_cli.presets import BASE_ALGOS
from epo_cli.spec import SpecError, deep_merge, resolve_spec, saved_spec, spec_field, spec_to_yaml

app = typer.Typer(
    help="Train LLM agents with EPO (Entropy-regularized Policy Optimization) on ScienceWorld and ALFWorld.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
spec_app = typer.Typer(help="Show and check experiment specs.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")
console = Console()
err_console = Console(stderr=True)

SpecFile = Annotated[Optional[Path], typer.Option("--spec", help="Experiment spec (YAML).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override any field: a.b=value (repeatable).")]

# Every flag that sets one spec field: its parameter name -> the field. Its help text is the
# field's description in spec.py, so `--help` and `epo spec show` say the same thing.
SPEC_FLAGS: dict[str, str] = {
    "env": "env.name",
    "algo": "algo.name",
    "variant": "algo.variant",
    "steps": "train.steps",
    "seed": "train.seed",
    "model": "model.name",
    "run_name": "tracking.run_name",
    "tracking_uri": "tracking.uri",
    "scale": "scale",
    "strategy": "distributed.strategy",
    "rollout_backend": "rollout.backend",
    "task_types": "env.task_types",
    "progress": "tracking.progress",
    "games": "sft.train_games",
    "epochs": "sft.epochs",
    "out": "sft.output_dir",
    "episodes": "eval.episodes",
    "temperature": "eval.temperature",
    "repeats": "eval.repeats",
}
# The flags of a training run: `epo train` and `epo spec show` (which prints what it would run).
RUN_FLAGS = ("env", "algo", "variant", "steps", "seed", "model", "run_name", "tracking_uri", "scale", "strategy",
             "rollout_backend", "task_types", "progress")


def spec_option(name: str) -> Any:
    """The typer annotation of spec flag ``name``: the field's type (optional) and its description."""
    field = spec_field(SPEC_FLAGS[name])
    kind = next((t for t in (int, float, Path) if t in (field.annotation, *get_args(field.annotation))), str)
    if get_origin(field.annotation) is list or list in map(get_origin, get_args(field.annotation)):
        kind = list[str]  # --task-types a,b --task-types c
    return Annotated[Optional[kind], typer.Option(help=escape(f"{SPEC_FLAGS[name]}: {field.description}"))]


def with_spec_flags(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the spec flags ``names`` (after its own options); it receives the set
    ones as one dict, ``flags``, ready for :func:`_flags`."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=spec_option(n)) for n in names]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            return command(flags={n: values.pop(n) for n in names}, **values)

        run.__signature__ = inspect.Signature([*own, *added])
        run.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        return run

    return decorate


TrackingUri = spec_option("tracking_uri")


def _flags(**fields: Any) -> dict[str, Any]:
    """Map CLI flags onto nested spec fields; unset flags are left out."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            continue
        if name == "task_types":
            value = ",".join(value)  # --task-types a,b --task-types c: one comma list
        nested: Any = value
        for key in reversed(SPEC_FLAGS[name].split(".")):
            nested = {key: nested}
        out = deep_merge(out, nested)
    return out


def _quiet_libraries(tracking_backend: str = "mlflow") -> None:
    """Our progress bars and tables are the output; silence the libraries' own (MLflow
    only where it is the tracking backend: elsewhere it is never imported)."""
    import logging
    import os

    import transformers

    if tracking_backend == "mlflow":
        import mlflow  # noqa: F401  (configures its loggers on import: quiet them after)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _say(message: str) -> None:
    """A line of plain text (paths and ids are never wrapped or colored)."""
    console.print(message, highlight=False, soft_wrap=True, markup=False)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _one_process(command: str) -> None:
    """Only `epo train` runs under torchrun; the other commands would repeat their work per rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _fail(f"epo {command} runs in one process; only `epo train` runs under torchrun (docs/scaling.md)")


def _run_errors() -> tuple[type[Exception], ...]:
    """The failures of a run that the CLI reports as one line (imported when needed: the
    CLI starts fast)."""
    from epo_cli.envs.pool import EnvWorkerError
    from epo_cli.envs.registry import DataError
    from epo_cli.models import ModelError
    from epo_cli.prompts import PromptTooLong
    from epo_cli.tracking import TrackingError

    return (SpecError, DataError, ModelError, TrackingError, PromptTooLong, EnvWorkerError, ValueError, FileNotFoundError)


def _initial_model(init_from: Path | None, model: str | None) -> str | None:
    """model.name from ``--init-from DIR`` (an absolute path: runs resume from any
    directory) or ``--model``, one of the two."""
    if init_from is None:
        return model
    if model is not None:
        _fail("--init-from sets the model; pass --model or --init-from, not both")
    if not (init_from / "config.json").exists():
        _fail(f"--init-from {init_from}: not a model folder (no config.json); `epo sft` writes one")
    return str(init_from.expanduser().resolve())


InitFrom = Annotated[
    Optional[Path], typer.Option(help="Start from this model folder (e.g. what `epo sft` wrote): sets model.name to it.")
]


def _resolve(spec_file, sets, **flags):
    try:
        return resolve_spec(spec_file, _flags(**flags), sets)
    except SpecError as err:
        _fail(str(err))


@app.command()
@with_spec_flags(*RUN_FLAGS)
def train(
    flags: dict[str, Any],
    spec: SpecFile = None,
    set_: Sets = None,
    init_from: InitFrom = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a run: its MLflow run id or a checkpoint folder.")] = None,
) -> None:
    """Train an agent (PPO or GRPO, with or without EPO) and log the run to MLflow.

    Data-parallel: torchrun --nproc_per_node N -m epo_cli train ... (docs/scaling.md)."""
    from epo_cli.checkpoint import find_checkpoint
    from epo_cli.distributed import init_distributed, shutdown_distributed
    from epo_cli.tracking import resolve_uri
    from epo_cli.trainer import TrainingFinished, TrainingStopped, run_training

    checkpoint = None
    if resume is not None:
        run_flags = [v for name, v in flags.items() if name not in ("tracking_uri", "progress")]
        if any(v is not None for v in (spec, set_, init_from, *run_flags)):
            _fail("--resume continues a run with its saved spec; pass only --tracking-uri or --progress with it")
        try:
            checkpoint = find_checkpoint(resume, flags["tracking_uri"])
        except FileNotFoundError as err:
            _fail(str(err))
        try:
            resolved = saved_spec(checkpoint / "spec.yaml", _flags(tracking_uri=flags["tracking_uri"], progress=flags["progress"]))
        except SpecError as err:
            _fail(str(err))
    else:
        resolved = _resolve(spec, set_, **flags | {"model": _initial_model(init_from, flags["model"])})
    _quiet_libraries(resolved.tracking.backend)
    dist = init_distributed(resolved.distributed.timeout_minutes)
    out = console if dist.is_main else Console(quiet=True)  # rank 0 speaks for the job
    out.print(
        f"[bold]epo train[/] {resolved.env.name} / {resolved.algo.name} ({resolved.algo.variant}) "
        f"scale={resolved.scale}: {resolved.train.steps} steps x {resolved.episodes_per_step} episodes, "
        f"<= {resolved.env.max_turns} turns, model {resolved.model.name}"
        + (f", {dist.world_size} processes ({resolved.distributed.strategy})" if dist.enabled else "")
    )
    store = resolve_uri(resolved.tracking.uri, resolved.tracking.backend)
    where = f"tracking ({resolved.tracking.backend}): {store}; checkpoints: {resolved.checkpoint.dir}"
    out.print(where, highlight=False, soft_wrap=True)
    if resolved.scale == "paper" and dist.device.type != "cuda":
        out.print("[yellow]warning:[/] paper scale without a GPU will take a very long time")
    try:
        run_id, last, checkpoint_root = run_training(resolved, out, resume_from=checkpoint, dist=dist)
    except TrainingFinished as err:
        out.print(str(err))
        return
    except TrainingStopped as err:
        if err.checkpoint is None:
            _fail(f"{err}; no checkpoint was written yet; the MLflow run {err.run_id} is marked KILLED; start it again")
        _fail(f"{err}; checkpoint {err.checkpoint}; the MLflow run is marked KILLED; continue: epo train --resume {err.checkpoint}")
    except _run_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("aborted mid-step; the MLflow run is marked KILLED; resume from its last checkpoint with --resume")
    finally:
        shutdown_distributed(dist)
    if not dist.is_main:
        return
    table = Table(title=f"run {run_id} (last step)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("train/success_rate", "train/reward_mean", "train/episode_turns", "train/invalid_action_rate",
                "actor/entropy", "epo/entropy_ref", "epo/beta", "epo/smooth_penalty", "actor/pg_loss_pos_adv",
                "actor/step_kl", "critic/value_loss", "perf/rollout_tokens_per_s", "perf/step_s"):
        if key in last:
            table.add_row(key, f"{last[key]:.4g}")
    console.print(table)
    console.print(f"{resolved.tracking.backend}: {store} (run {run_id}); checkpoint: {checkpoint_root}")


@spec_app.command("show")
@with_spec_flags(*RUN_FLAGS)
def spec_show(flags: dict[str, Any], spec: SpecFile = None, set_: Sets = None) -> None:
    """Print the fully resolved spec as YAML, each field with its description (what `epo
    train` with the same flags runs)."""
    resolved = _resolve(spec, set_, **flags)
    sys.stdout.write(spec_to_yaml(resolved, comments=True))


@spec_app.command("check")
def spec_check(files: list[Path]) -> None:
    """Validate spec files; print one line per file."""
    failed = False
    for path in files:
        try:
            resolve_spec(path)
            console.print(f"ok  {path}")
        except SpecError as err:
            failed = True
            err_console.print(f"[red]bad[/] {err}", highlight=False)
    if failed:
        raise typer.Exit(2)


@app.command()
def envs(data_dir: Annotated[Optional[Path], typer.Option(help="ALFWorld's env.data_dir.")] = None) -> None:
    """List environments, their splits, task counts and task types."""
    from epo_cli.envs.registry import DataError, load_split, splits_of

    table = Table(title="environments")
    for column in ("env", "split", "tasks", "task types"):
        table.add_column(column)
    for env in ENVS:
        for split in splits_of(env):
            try:
                tasks = load_split(env, data_dir, split)
            except (DataError, FileNotFoundError, ValueError) as err:
                table.add_row(env, split, "[red]no data[/]", str(err))
                continue
            types = sorted({t.task_type for t in tasks})
            shown = f"{len(types)}: {types[0]}, ..." if len(types) > 1 else ", ".join(types)
            table.add_row(env, split, str(len(tasks)), shown)
    console.print(table)


data_app = typer.Typer(help="Prepare environment data and expert trajectories.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    env: Annotated[str, typer.Argument(help="alfworld")],
    from_: Annotated[
        Optional[Path], typer.Option("--from", help="Folder with alfworld-json_2.1.1-{train,valid}.tar.gz (default: download).")
    ] = None,
    to: Annotated[Optional[Path], typer.Option(help="Target data folder (default: $ALFWORLD_DATA, else ~/.cache/alfworld).")] = None,
    if_missing: Annotated[
        bool, typer.Option("--if-missing", help="Do nothing when the games are found where runs look for them "
                           "($ALFWORLD_DATA, $EPO_DATA_DIR/alfworld, ~/.cache/alfworld, the epo cache).")
    ] = False,
) -> None:
    """Get ALFWorld's json_2.1.1 games: run the official `alfworld-download`, or extract the
    release archives (`--from`) into the same layout."""
    import os

    from epo_cli.envs import alfworld
    from epo_cli.envs.registry import DataError, data_dir

    if env != "alfworld":
        _fail(f"`epo data prepare` knows alfworld only (ScienceWorld's splits come from its engine), got {env!r}")
    if if_missing:
        try:
            console.print(f"found: {data_dir('alfworld', None)}")
            return
        except DataError:
            pass
    target = to or Path(os.environ.get("ALFWORLD_DATA") or alfworld.default_download_dir())
    try:
        if from_ is None:
            console.print(f"downloading ALFWorld data with `{alfworld.DOWNLOAD_SCRIPT}` into {target} (several minutes)")
            alfworld.download(target)
        else:
            alfworld.prepare(from_, target)
    except (FileNotFoundError, ConnectionError) as err:
        _fail(str(err))
    for split, folder in alfworld.SPLITS.items():
        games = len(alfworld.load_split("alfworld", target, split)) if (target / "json_2.1.1" / folder).is_dir() else 0
        console.print(f"{split}: {games} games")
    console.print(f"ready: {target}" + (f" (export ALFWORLD_DATA={target}, or pass --set env.data_dir={target})" if to else ""))


@data_app.command("expert")
@with_spec_flags("env", "task_types")
def data_expert(
    flags: dict[str, Any],
    split: Annotated[str, typer.Option(help="train, iid, ood (ScienceWorld also l2).")] = "train",
    games: Annotated[int, typer.Option(help="The first N games of the split's fixed order (after --task-types).")] = 40,
    set_: Sets = None,
) -> None:
    """Play and cache expert trajectories (ALFWorld planner, ScienceWorld gold path) for `epo sft`."""
    _one_process("data expert")
    from epo_cli.envs.registry import DataError
    from epo_cli.expert import cache_file, expert_trajectories
    from epo_cli.progress import progress_bar

    resolved = _resolve(None, set_, **flags)
    try:
        with progress_bar(console) as progress:
            trajectories = expert_trajectories(resolved.env.name, resolved.env.data_dir, split, resolved.env.task_types, games,
                                               resolved.sft.expert_dir, resolved.env.jvm_heap, progress)
    except (DataError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    table = Table(title=f"expert trajectories: {resolved.env.name} {split}")
    for column in ("task type", "games", "won", "steps (mean)", "steps (max)"):
        table.add_column(column, justify="right")
    for task_type in sorted({t.task_type for t in trajectories}):
        of_type = [t for t in trajectories if t.task_type == task_type]
        lengths = [len(t.steps) for t in of_type if t.won] or [0]
        table.add_row(task_type, str(len(of_type)), str(sum(t.won for t in of_type)), f"{sum(lengths) / len(lengths):.1f}", str(max(lengths)))
    console.print(table)
    for failed in (t for t in trajectories if not t.won):
        console.print(f"[yellow]skipped in training:[/] {escape(failed.key)}: {escape(failed.failure or '')}", highlight=False)
    console.print(f"cache: {cache_file(resolved.sft.expert_dir, resolved.env.name, split)}")


@app.command()
@with_spec_flags("env", "model", "task_types", "games", "epochs", "out", "seed", "run_name", "tracking_uri", "scale")
def sft(flags: dict[str, Any], spec: SpecFile = None, set_: Sets = None) -> None:
    """Warm-start a model on expert trajectories (supervised, in RL's prompt and answer format).

    Writes a model folder for `epo train --init-from` and `epo eval --model`."""
    _one_process("sft")
    from epo_cli.sft import SFTError, run_sft
    from epo_cli.tracking import resolve_uri

    resolved = _resolve(spec, set_, **flags)
    _quiet_libraries(resolved.tracking.backend)
    try:
        result = run_sft(resolved, console)
    except (SFTError, *_run_errors()) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("aborted: no model folder was written; the expert games played so far are cached")
    table = Table(title=f"SFT run {result.run_id} (held-out expert steps)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("heldout/loss", "heldout/token_accuracy", "heldout/valid_format_rate", "heldout/admissible_rate",
                "heldout/expert_match_rate", "data/train_steps", "data/heldout_steps", "data/target_tokens_max"):
        if key in result.metrics:
            table.add_row(key, f"{result.metrics[key]:.4g}")
    console.print(table)
    store = resolve_uri(resolved.tracking.uri, resolved.tracking.backend)
    console.print(f"{resolved.tracking.backend}: {store} (run {result.run_id}); model: {result.output_dir}")
    types = f" --task-types {','.join(resolved.env.task_types)}" if resolved.env.task_types else ""
    console.print(f"next: epo train --init-from {result.output_dir} --env {resolved.env.name}{types}")


@app.command(name="eval")
@with_spec_flags("env", "task_types", "episodes", "temperature", "repeats", "tracking_uri")
def eval_(
    flags: dict[str, Any],
    target: Annotated[
        Optional[str], typer.Argument(help="An MLflow run id, a run's checkpoint folder, or one checkpoint (step_N); or --model.")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help="Evaluate a model that has no run: smollm2-135m, tiny, or a model folder (e.g. from `epo sft`).")
    ] = None,
    set_: Sets = None,
    split: Annotated[str, typer.Option(help="iid, ood, l2, all (iid and ood), or train (training games, to choose settings on).")] = "all",
    greedy: Annotated[bool, typer.Option(help="Greedy decoding (eval.temperature=0).")] = False,
    spec_file: SpecFile = None,
    save: Annotated[Optional[Path], typer.Option(help="Write every episode's outcome to this JSON file.")] = None,
    compare: Annotated[
        Optional[Path], typer.Option(help="A file from --save: compare on the same episodes (sign test and bootstrap over tasks).")
    ] = None,
    transcripts: Annotated[
        Optional[Path], typer.Option(help="Also write every episode, turn by turn, to DIR/<split>.jsonl (read with `epo show FILE`).")
    ] = None,
    logged: Annotated[
        bool, typer.Option(help="Read the run's logged evaluation (at --step; default the latest) instead of playing it again: training's, "
                  "or the latest `epo eval RUN_ID` of that step and split, which replaces it.")
    ] = False,
    step: Annotated[Optional[int], typer.Option(help="With --logged: the evaluation step.")] = None,
) -> None:
    """Success on the fixed, seeded IID / OOD / L2 episodes, with 95% intervals over games.

    Of a run's checkpoint (logged to that run), of any model with --model (printed only;
    --spec, --env, --task-types and --set set up its episodes), or, with --logged, as the
    run's training already evaluated it (e.g. to --save or --compare its final evaluation)."""
    _one_process("eval")
    from epo_cli.checkpoint import find_checkpoint
    from epo_cli.evaluate import evaluate_checkpoint, evaluate_model
    from epo_cli.progress import progress_bar

    if greedy:
        flags["temperature"] = 0.0
    _check_eval_options(target, model, flags, set_ or spec_file, transcripts, logged, step)
    baseline = _outcomes_file(compare, "--compare") if compare is not None else None
    _quiet_libraries()
    splits = ["iid", "ood"] if split == "all" else [split]
    tracking_uri, run_id = flags["tracking_uri"], None
    try:
        with progress_bar(console) as progress:
            if logged:
                results, title = _logged_evaluation(target, step, splits, tracking_uri)
            elif model is not None:
                resolved = resolve_spec(spec_file, _flags(**flags | {"model": model}), set_)
                results = evaluate_model(resolved, model, splits, progress)
                title = f"evaluation of {model} on {resolved.env.name}"
            else:
                checkpoint = find_checkpoint(target, tracking_uri)
                results, run_id, step = evaluate_checkpoint(
                    checkpoint, splits, flags["episodes"], flags["temperature"], tracking_uri, progress, flags["repeats"]
                )
                title = f"evaluation of {checkpoint} (step {step})"
    except (*_run_errors(), LookupError) as err:
        _fail(str(err))
    console.print(_evaluation_table(results, title))
    if save is not None:
        from epo_cli.stats import write_outcomes

        write_outcomes(save, title, results)
        console.print(f"episode outcomes written to {save}")
    if transcripts is not None:
        from epo_cli.paths import write_atomically
        from epo_cli.transcripts import episodes_jsonl

        for result in results:
            write_atomically(transcripts / f"{result.split}.jsonl", episodes_jsonl(result.played))
        _say(f"episodes written to {transcripts} (epo show {transcripts / (results[0].split + '.jsonl')})")
    if baseline is not None:
        _print_comparison(baseline, results, compare)
    console.print(_per_type_table(results))
    if run_id:
        console.print(f"logged to MLflow run {run_id} at step {step}")


def _check_eval_options(target: str | None, model: str | None, flags: dict[str, Any], spec_options: Any,
                        transcripts: Path | None, logged: bool, step: int | None) -> None:
    """Fail in one line on a combination of `epo eval` options that does not go together."""
    if (target is None) == (model is None):
        _fail("epo eval takes a run (RUN_ID or a checkpoint folder) or --model NAME_OR_DIR, one of the two")
    if target is not None and (flags["env"] or flags["task_types"] or spec_options):
        _fail("--spec, --env, --task-types and --set go with --model; a run is evaluated with its own spec")
    playing = (flags["episodes"], flags["temperature"], flags["repeats"], transcripts)
    if logged and (target is None or any(v is not None for v in playing)):
        _fail("--logged reads a run's logged evaluation: it takes RUN_ID (not --model, --episodes, --temperature, --greedy, "
              "--repeats or --transcripts)")
    if logged and Path(target).exists():
        _fail(f"--logged reads a run's logged evaluation from MLflow: it takes a run id or name, not the folder {target}")
    if step is not None and not logged:
        _fail("--step goes with --logged; a checkpoint folder (step_N) picks the step of a new evaluation")


def _evaluation_table(results: list, title: str) -> Table:
    table = Table(title=title)
    for column in ("split", "episodes", "success", "95% CI", "score", "turns", "invalid"):
        table.add_column(column, justify="right")
    for result in results:
        low, high = result.interval
        table.add_row(result.split, str(result.episodes), f"{result.success_rate:.3f}", f"[{low:.3f}, {high:.3f}]",
                      f"{result.mean_score:.2f}", f"{result.mean_turns:.1f}", f"{result.invalid_action_rate:.2f}")
    return table


def _per_type_table(results: list) -> Table:
    table = Table(title="success per task type")
    table.add_column("task type")
    for result in results:
        table.add_column(result.split, justify="right")
    for task_type in sorted({t for r in results for t in r.per_type}):
        cells = []
        for result in results:
            wins, n = result.per_type.get(task_type, (0, 0))
            cells.append(f"{wins}/{n}" if n else "-")
        table.add_row(task_type, *cells)
    return table


def _logged_evaluation(target: str, step: int | None, splits: list[str], tracking_uri: str | None) -> tuple[list, str]:
    """Each split's evaluation as the run logged it at ``step`` (default: its latest), and a title."""
    from epo_cli.evaluate import logged_result
    from epo_cli.spec import TrackingSpec
    from epo_cli.tracking import run_episodes
    from epo_cli.transcripts import read_episodes

    results, chosen_steps = [], set()
    for split in splits:
        run, chosen, text, _ = run_episodes(target, step, split, TrackingSpec().experiment, tracking_uri)
        source = f"{run.info.run_name} ({run.info.run_id}), {chosen.label}"
        results.append(logged_result(split, read_episodes(text, source), source))
        chosen_steps.add(chosen.step)
    if len(chosen_steps) > 1:
        raise LookupError(f"run {target}: its latest evaluations of {', '.join(splits)} are of different steps "
                          f"({', '.join(map(str, sorted(chosen_steps)))}); pass --step")
    return results, f"logged evaluation of {run.info.run_name} ({run.info.run_id}), step {chosen.step}"


def _outcomes_file(path: Path, option: str) -> dict:
    from epo_cli.stats import read_outcomes

    try:
        return read_outcomes(path, option)
    except ValueError as err:
        _fail(str(err))


def _print_comparison(baseline: dict, results, source: Path) -> None:
    from epo_cli.stats import compare_paired

    table = Table(title=f"paired comparison with {source} (same tasks and seeds)")
    for column in ("split", "metric", "episode pairs", "before", "after", "after - before",
                   "95% CI (bootstrap over tasks)", "tasks worse", "tasks better", "sign test p"):
        table.add_column(column, justify="right")
    for result in results:
        if result.split not in baseline:
            continue
        both = baseline[result.split] + result.outcomes
        partial_scores = any(o.score != float(o.won) for o in both)  # ScienceWorld: score says more than success
        for metric in ("success", "score") if partial_scores else ("success",):
            try:
                c = compare_paired(baseline[result.split], result.outcomes, metric)
            except ValueError as err:
                _fail(f"--compare {source}: {result.split}: {err}")
            low, high = c.bootstrap_interval
            table.add_row(result.split, metric, str(c.pairs), f"{c.before:.3f}", f"{c.after:.3f}", f"{c.difference:+.3f}",
                          f"[{low:+.3f}, {high:+.3f}]", str(c.tasks_worse), str(c.tasks_better), f"{c.sign_test_p:.3g}")
    console.print(table)


def _parse_seeds(values: list[str]) -> list[int]:
    """``["0,1", "2"]`` -> ``[0, 1, 2]``: comma-separated and repeated --seeds alike."""
    seeds = []
    for part in (p.strip() for value in values for p in value.split(",")):
        try:
            seeds.append(int(part))
        except ValueError:
            _fail(f"--seeds: expected integers, e.g. --seeds 0,1,2 or --seeds 0 --seeds 1; got {part!r}")
    if len(set(seeds)) != len(seeds):
        _fail(f"--seeds: each seed once, got {', '.join(map(str, seeds))}")
    return seeds


@app.command()
@with_spec_flags("env", "steps", "model", "tracking_uri", "scale")
def ablate(
    flags: dict[str, Any],
    ablation: Annotated[
        Optional[str], typer.Argument(help="smoothing, weighting, penalty-form, history, decay, ea or baseline; or --sweep.")
    ] = None,
    sweep: Annotated[
        Optional[Path], typer.Option(help="A sweep file: base spec, arms as overrides, seeds (docs/study.md).")
    ] = None,
    algo: Annotated[str, typer.Option(help="The base algorithm of an ablation: ppo or grpo.")] = "ppo",
    seeds: Annotated[list[str], typer.Option(help="Seeds of an ablation: --seeds 0,1,2 or --seeds 0 --seeds 1.")] = ["0"],  # noqa: B006
    records: Annotated[
        Optional[Path], typer.Option(help="A folder of run records (one JSON file per finished child): children recorded "
                                     "there with the same settings are not run again, the others are recorded there.")
    ] = None,
    spec: SpecFile = None,
    set_: Sets = None,
    init_from: InitFrom = None,
) -> None:
    """The paper's ablations, or the arms of a sweep file: one MLflow parent run, a child
    per (variant, seed), a summary. Re-running the same command resumes it; with --records,
    also on another machine or store."""
    _one_process("ablate")
    from epo_cli.ablate import print_summary, run_ablation, run_sweep

    if (ablation is None) == (sweep is None):
        _fail("epo ablate takes an ablation name or --sweep FILE, one of the two")
    if sweep is not None and (spec is not None or seeds != ["0"] or algo != "ppo"):
        _fail("--sweep: the sweep file names the base spec, the arms and the seeds (not --spec, --seeds, --algo)")
    base = algo.removesuffix("+epo")
    if base not in BASE_ALGOS:
        _fail(f"--algo: expected one of {', '.join(BASE_ALGOS)}, got {algo!r}")
    seed_list = _parse_seeds(seeds)
    _quiet_libraries()
    flags = _flags(**flags | {"model": _initial_model(init_from, flags["model"])})
    from epo_cli.trainer import TrainingStopped

    try:
        if sweep is not None:
            parent_id, rows = run_sweep(sweep, flags, set_ or [], console, records)
        else:
            parent_id, rows = run_ablation(ablation, base, seed_list, spec, flags, set_ or [], console, records)
    except TrainingStopped as err:
        saved = f"checkpoint {err.checkpoint}" if err.checkpoint is not None else "no checkpoint of that run yet"
        _fail(f"{err}; {saved}; run the same command again to continue")
    except KeyboardInterrupt:
        _fail("aborted mid-step; run the same command again to continue from the last checkpoints")
    except _run_errors() as err:
        _fail(str(err))
    print_summary(console, f"ablation {ablation}" if sweep is None else f"sweep {sweep}", parent_id, rows)
    drawn_from = f"--records {records}" if records is not None else f"--parent {parent_id}"
    console.print(f"summary logged to parent run {parent_id} (summary.csv, summary.md); draw it: epo plot ablation {drawn_from}")


@app.command()
def plot(
    kind: Annotated[str, typer.Argument(help="entropy, reward, success, corridor or ablation.")],
    run: Annotated[
        Optional[list[str]], typer.Option(help="Run id or run name (repeatable, overlaid); default: the latest run.")
    ] = None,
    parent: Annotated[Optional[str], typer.Option(help="Ablation parent run id (for `ablation`); default: the latest.")] = None,
    records: Annotated[
        Optional[Path], typer.Option(help="ablation: draw the run records of this folder (`epo ablate --records`), not a store's runs.")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "epo",
    metric: Annotated[str, typer.Option(help="Metric of the ablation figure.")] = "train/reward_mean",
    start: Annotated[
        Optional[Path], typer.Option(help="success / ablation: the starting model's `epo eval --save` file, drawn on the success panels.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs/plots"),
    tracking_uri: TrackingUri = None,
) -> None:
    """Draw a figure from MLflow runs as PNG and SVG (by default from the latest run, or
    the arms of the latest ablation)."""
    from epo_cli.plots import PLOTS, PlotError, draw, draw_ablation
    from epo_cli.records import RecordError, read_records
    from epo_cli.tracking import TrackingError, connect, find_run, latest_runs, resolve_uri

    if kind not in PLOTS:
        _fail(f"plot kind {kind!r} is unknown; expected one of {', '.join(PLOTS)}")
    if start is not None and kind not in ("ablation", "success"):
        _fail("--start goes with `epo plot success` or `epo plot ablation`")
    if records is not None and (kind != "ablation" or parent is not None):
        _fail("--records goes with `epo plot ablation`, instead of --parent")
    start_outcomes = (start.name, _outcomes_file(start, "--start")) if start is not None else None
    slug = metric.replace("/", "_")  # one file per metric
    try:
        if records is not None:
            found = read_records(records)
            if not found:
                _fail(f"--records {records}: no run records there (`epo ablate ... --records {records}` writes them)")
            title = "Run records: " + ", ".join(dict.fromkeys(record.study for record in found))
            paths = draw_ablation(found, title, out, f"ablation_{records.name}_{slug}", metric, start_outcomes)
        elif kind == "ablation":
            paths = _draw_store_ablation(parent, experiment, tracking_uri, out, metric, slug, start_outcomes)
        else:
            client, experiment_id = connect(tracking_uri, experiment)
            if run:
                runs = [find_run(client, experiment_id, r) for r in run]
            else:
                runs, note = latest_runs(client, experiment_id, f"experiment {experiment!r} of {resolve_uri(tracking_uri)}")
                _say(note)
            paths = draw(kind, client, runs, out, f"{kind}_" + "_".join(r.info.run_id[:8] for r in runs), start_outcomes)
    except (TrackingError, PlotError, RecordError, LookupError) as err:
        _fail(str(err))
    for path in paths:
        console.print(f"wrote {path}")


def _draw_store_ablation(parent: str | None, experiment: str, tracking_uri: str | None, out: Path, metric: str,
                         slug: str, start_outcomes) -> list[Path]:
    """`epo plot ablation` of a store's parent run (default: the latest ablation or sweep)."""
    from epo_cli.plots import draw_ablation
    from epo_cli.records import RECORD_METRICS, record_of
    from epo_cli.tracking import connect, resolve_uri

    client, experiment_id = connect(tracking_uri, experiment)
    if not parent:
        latest = client.search_runs(
            [experiment_id], "tags.`epo.ablation.key` != ''", order_by=["attributes.start_time DESC"], max_results=1
        )
        if not latest:
            _fail(f"no ablation in experiment {experiment!r} of {resolve_uri(tracking_uri)}: run `epo ablate`, or pass --parent RUN_ID")
        parent = latest[0].info.run_id
        _say(f"plotting the latest ablation, {latest[0].info.run_name} ({parent})")
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'")
    parent_tags = client.get_run(parent).data.tags
    study = parent_tags.get("epo.ablation", "")
    records = [
        record_of(client, run, study, run.data.tags.get("epo.ablation.variant", run.info.run_name or run.info.run_id[:8]),
                  int(run.data.tags.get("epo.seed", 0)), "", keys=(*RECORD_METRICS, metric))
        for run in runs
    ]
    title = f"{'Sweep' if 'epo.sweep' in parent_tags else 'Ablation'}: {study}"
    return draw_ablation(records, title, out, f"ablation_{parent[:8]}_{slug}", metric, start_outcomes)


@app.command()
def show(
    target: Annotated[
        Optional[str], typer.Argument(help="A run id or name, or an episode file (.jsonl); default: the latest run with episodes.")
    ] = None,
    step: Annotated[Optional[int], typer.Option(help="The training step (or evaluation step); default: the latest.")] = None,
    episode: Annotated[Optional[int], typer.Option(help="Print this episode turn by turn.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Show the evaluation episodes of this split (iid, ood, l2).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "epo",
    tracking_uri: TrackingUri = None,
) -> None:
    """What the agent did: one line per episode of a step, or one episode turn by turn
    (observation, raw response, parsed action or why it was invalid, reward, entropy)."""
    from epo_cli.tracking import TrackingError, run_episodes
    from epo_cli.transcripts import episode_view, read_episodes, summary_table

    try:
        if target is not None and target.endswith(".jsonl"):
            source, text = target, _read_text(Path(target))
        else:
            run, chosen, text, note = run_episodes(target, step, split, experiment, tracking_uri)
            if note:
                _say(note)
            source = f"{run.info.run_name} ({run.info.run_id}), {chosen.label}"
        episodes = read_episodes(text, source)
    except (TrackingError, LookupError, ValueError) as err:
        _fail(str(err))
    if episode is None:
        console.print(summary_table(episodes, source))
        if episodes:
            _say(f"one episode turn by turn: add --episode {episodes[0]['episode']}")
        return
    chosen = [e for e in episodes if e["episode"] == episode]
    if not chosen:
        _fail(f"--episode {episode}: {source} has episodes {', '.join(str(e['episode']) for e in episodes)}")
    console.print(episode_view(chosen[0]))


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise LookupError(f"episode file {path}: {err.strerror}") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
