"""Figures from tracked runs: the analogues of the paper's Figures 1-3, as PNG and SVG."""

from __future__ import annotations

import statistics
from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PLOTS = ("entropy", "reward", "success", "corridor", "ablation")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2", "#7f7f7f", "#bcbd22")  # cycled past 10 lines


class PlotError(ValueError):
    """The runs hold no data for the requested figure."""


def series(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]


def _label(run) -> str:
    return run.info.run_name or run.info.run_id[:8]


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _style(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("RL step (policy after k updates)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)


def plot_entropy(client, runs) -> plt.Figure:
    """Figure 1: token entropy of the earliest and the latest turn index across steps (a
    one-turn run has only the all-turns line, which is its turn 0)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for color, run in zip(cycle(COLORS), runs):
        turns = sorted(int(k.rsplit("_", 1)[1]) for k in run.data.metrics if k.startswith("actor/entropy_turn_"))
        if not turns:
            continue
        for turn, style in ((turns[0], "--"), (turns[-1], ":")) if len(turns) > 1 else ():
            steps, values = series(client, run.info.run_id, f"actor/entropy_turn_{turn}")
            ax.plot(steps, values, style, color=color, marker=".", label=f"{_label(run)}: turn {turn}")
        steps, values = series(client, run.info.run_id, "actor/entropy")
        ax.plot(steps, values, "-", color=color, lw=2, label=f"{_label(run)}: all turns")
        drawn += 1
    if not drawn:
        raise PlotError("no actor/entropy_turn_* metrics in these runs")
    _style(ax, "Entropy of early vs late turns", "mean token entropy (nats)")
    return fig


def plot_reward(client, runs) -> plt.Figure:
    """Figure 2 (a, d): training reward and success across steps."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for color, run in zip(cycle(COLORS), runs):
        for ax, key in ((left, "train/reward_mean"), (right, "train/success_rate")):
            steps, values = series(client, run.info.run_id, key)
            ax.plot(steps, values, "-", color=color, marker=".", label=_label(run))
    _style(left, "Training reward", "mean episode reward")
    _style(right, "Training success", "success rate")
    right.set_ylim(-0.02, 1.02)
    return fig


def plot_success(client, runs, start: tuple[str, dict] | None = None) -> plt.Figure:
    """Figure 2 (b-c, e-f): IID and OOD success over training with their 95% bands (over
    games, as logged); ``start``: (label, split -> outcomes) of the starting model on the
    same episodes, drawn as a line (the learning curve against its warm start)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    drawn = 0
    for ax, split in zip(axes, ("iid", "ood")):
        for color, run in zip(cycle(COLORS), runs):
            steps, values = series(client, run.info.run_id, f"eval/{split}/success_rate")
            if not steps:
                continue
            _, low = series(client, run.info.run_id, f"eval/{split}/success_ci_low")
            _, high = series(client, run.info.run_id, f"eval/{split}/success_ci_high")
            ax.plot(steps, values, "-", color=color, marker="o", label=_label(run))
            if len(low) == len(steps) == len(high):
                ax.fill_between(steps, low, high, color=color, alpha=0.15)
            drawn += 1
        if start is not None and split in start[1]:
            starting_point(ax, start[0], start[1][split])
        _style(ax, f"{split.upper()} success (95% CI)", "success rate")
        ax.set_ylim(-0.02, 1.02)
    if not drawn:
        raise PlotError("no eval/*/success_rate metrics in these runs (train with eval.every > 0, or run `epo eval`)")
    return fig


def _kappas(params: dict[str, str]) -> tuple[float, float]:
    """A run's corridor bounds ``kappa_l, kappa_r`` (Eq. 4), from its params."""
    return float(params.get("epo.smoothing.kappa_l", 0.0)), float(params.get("epo.smoothing.kappa_r", 2.0))


def plot_corridor(client, runs) -> plt.Figure:
    """The smoothing corridor ``[kappa_l Hbar, kappa_r Hbar]`` (Eq. 4) and the entropy."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for color, run in zip(cycle(COLORS), runs):
        ref_steps, refs = series(client, run.info.run_id, "epo/entropy_ref")
        steps, entropy = series(client, run.info.run_id, "actor/entropy")
        if not ref_steps:
            continue
        kappa_l, kappa_r = _kappas(run.data.params)
        ax.fill_between(ref_steps, [kappa_l * r for r in refs], [kappa_r * r for r in refs], color=color, alpha=0.15,
                        label=f"{_label(run)}: corridor [{kappa_l:g}·H̄, {kappa_r:g}·H̄]")
        ax.plot(ref_steps, refs, "--", color=color, label=f"{_label(run)}: H̄ (history)")
        ax.plot(steps, entropy, "-", color=color, marker=".", lw=2, label=f"{_label(run)}: entropy")
        drawn += 1
    if not drawn:
        raise PlotError("no epo/entropy_ref metrics in these runs (needs an EPO run of 2+ steps)")
    _style(ax, "Entropy and the smoothing corridor", "mean token entropy (nats)")
    return fig


def _over_seeds(records, key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and population std over ``records`` of a metric, at every step any run logged."""
    per_step: dict[int, list[float]] = {}
    for record in records:
        for step, value in zip(*record.series(key)):
            per_step.setdefault(step, []).append(value)
    steps = sorted(per_step)
    return steps, [statistics.mean(per_step[s]) for s in steps], [statistics.pstdev(per_step[s]) for s in steps]


def _band(ax, steps: list[int], mean: list[float], std: list[float], color: str, label: str, style: str = "-") -> None:
    ax.plot(steps, mean, style, color=color, marker=".", label=label)
    ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], color=color, alpha=0.15)


# The panels of the ablation figure after the chosen metric: (title, y label, metrics drawn per variant).
ABLATION_PANELS = (
    ("IID success (evaluation)", "success rate", ("eval/iid/success_rate",)),
    ("OOD success (evaluation)", "success rate", ("eval/ood/success_rate",)),
    ("Episodes ended by the decoy (training)", "share of episodes", ("train/decoy_rate",)),
    ("Entropy and the smoothing corridor", "mean token entropy (nats)", ("actor/entropy",)),
    ("Variance of the step's token entropies", "variance (nats^2)", ("actor/entropy_var",)),
    ("Tokens outside the corridor", "share of tokens", ("epo/out_of_corridor_frac",)),
    ("Entropy weight beta_k (Eq. 5)", "beta_k", ("epo/beta",)),
    ("Gradient norm of each EPO term / policy gradient's", "ratio", ("grad/entropy_bonus_ratio", "grad/smooth_ratio")),
)


def plot_ablation(records, title: str, metric: str = "train/reward_mean", start: tuple[str, dict] | None = None) -> plt.Figure:
    """Figure 3 and the study's panels, from the children's run records (:mod:`epo_cli.records`):
    per variant, the mean over seeds with a ±1 std band of ``metric``, IID and OOD success,
    the entropy with its corridor ``[kappa_l Hbar, kappa_r Hbar]`` (Eq. 4), ``beta_k`` and
    the EPO terms' gradient-norm ratios; panels without data are left out. ``start``:
    (label, outcomes by split) of the model the runs started from (an ``epo eval --save``
    file), drawn on the success panels."""
    by_variant: dict[str, list] = {}
    for record in records:
        if not record.diverged:
            by_variant.setdefault(record.variant, []).append(record)
    if not by_variant:
        raise PlotError("the ablation has no finished child runs")
    if not any(record.metrics.get(metric) for runs in by_variant.values() for record in runs):
        raise PlotError(f"--metric {metric}: no finished child logged it")
    panels = [(metric, metric.split("/")[-1], (metric,))] + [
        panel for panel in ABLATION_PANELS
        if panel[2] != (metric,) and any(record.metrics.get(key) for runs in by_variant.values() for record in runs
                                         for key in panel[2])
    ]
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax, (panel_title, ylabel, keys) in zip(axes.flat, panels):
        for color, (variant, runs) in zip(cycle(COLORS), by_variant.items()):
            if keys == ("epo/beta",) and not _smooths(runs[0].params):
                continue  # beta_k scales L_smooth only
            for key, style in zip(keys, ("-", "--")):
                steps, mean, std = _over_seeds(runs, key)
                if key.startswith("grad/"):  # log scale: a ratio is 0 where its term is absent (EPO-Base, no EPO)
                    kept = [point for point in zip(steps, mean, std) if point[1] > 0]
                    steps, mean, std = (list(column) for column in zip(*kept)) if kept else ([], [], [])
                if not steps:
                    continue
                label = f"{variant} (n={len(runs)})" + (f": {key.split('/')[-1]}" if len(keys) > 1 else "")
                _band(ax, steps, mean, std, color, label, style)
            if keys == ("actor/entropy",) and _smooths(runs[0].params):
                _corridor(ax, runs, color)
        split = keys[0].split("/")[1] if keys[0].endswith("/success_rate") and keys[0].startswith("eval/") else None
        if start is not None and split in start[1]:
            starting_point(ax, start[0], start[1][split])
        _style(ax, panel_title, ylabel)
        if keys[0].startswith("grad/"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title} (mean ± std over seeds)")
    return fig


def starting_point(ax, label: str, outcomes) -> None:
    """The success of the runs' starting model on the same episodes: a dotted line at its
    rate over a band of its 95% interval over games."""
    from epo_cli.stats import game_interval

    wins, n = sum(o.won for o in outcomes), len(outcomes)
    low, high = game_interval(list(outcomes))
    ax.axhspan(low, high, color="black", alpha=0.06, linewidth=0)
    ax.axhline(wins / max(n, 1), color="black", linestyle=":", label=f"start, {label}: {wins}/{n}")


def _smooths(params: dict[str, str]) -> bool:
    """Whether a run's objective, by its params, has the smoothing term (EPO; not EPO-Base,
    not plain PPO/GRPO)."""
    return params.get("epo.smoothing.enabled") == "True" and float(params.get("epo.entropy_coef", 0)) > 0


def _corridor(ax, records, color: str) -> None:
    """The mean over seeds of the corridor ``[kappa_l Hbar, kappa_r Hbar]``, where the runs have ``Hbar``."""
    steps, refs, _ = _over_seeds(records, "epo/entropy_ref")
    if not steps:
        return
    kappa_l, kappa_r = _kappas(records[0].params)
    ax.fill_between(steps, [kappa_l * r for r in refs], [kappa_r * r for r in refs], color=color, alpha=0.07, hatch="//",
                    edgecolor=color, linewidth=0)


def draw(kind: str, client, runs, out_dir: Path, name: str, start: tuple[str, dict] | None = None) -> list[Path]:
    """One figure of runs (every kind but ``ablation``, which :func:`plot_ablation` draws from records)."""
    if kind == "success":
        fig = plot_success(client, runs, start)
    else:
        fig = {"entropy": plot_entropy, "reward": plot_reward, "corridor": plot_corridor}[kind](client, runs)
    return _save(fig, out_dir, name)


def draw_ablation(records, title: str, out_dir: Path, name: str, metric: str = "train/reward_mean",
                  start: tuple[str, dict] | None = None) -> list[Path]:
    return _save(plot_ablation(records, title, metric, start), out_dir, name)
