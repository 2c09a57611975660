"""Figures from tidy run tables: pure functions from rows (and tensors) to matplotlib Figures.

Every function selects and pivots rows, averages repeated rows (seeds, sites) for display, and
draws; none computes a metric. Figures are built with ``matplotlib.figure.Figure`` (not pyplot),
so drawing never touches global pyplot state and works on any backend; the seaborn look is
applied only inside ``style()``. Row schemas (column names are exact):

================== ==========================================================================
figure             rows
================== ==========================================================================
concentration      metric "accuracy", fraction (% energy kept, 5..100), task, value; the
                   unmodified model: rows with baseline == True (else fraction 100)
sensitivity        metric "accuracy", side ("input"/"output"), group (0..G-1; -1 or
                   baseline == True = unperturbed, side may be empty there), task, seed, value;
                   optional eps (several: a row of panels each, and the curve over eps)
edit metrics       arm, round (0 = before editing), metric in EDIT_METRICS (0-100), value;
                   plus general ability: metric "accuracy", task, arm, round, value
LS                 metric "LS", arm, round, site, value
norm growth        metric in NORM_METRICS, arm, round, site, value
t-SNE              prompt_idx, phase ("pre"/"post"), x, y, optional arm (metric "tsne" if any)
tau sweep          tau (NaN or "off" for the unfiltered arm), metric, value, optional task,
                   round (the final round per tau is used)
energy spectrum    metric "k" and/or "k_over_rank", tau, site, value
SS heatmaps        tensors under ``spectra.results.ss_key(side, arm, round, site)`` (k x r)
================== ==========================================================================

A task named "mean" is the experiment's own task mean. When an ``experiment`` column names the
figure's experiment ("concentration", "sensitivity"), only those rows are used. Wherever the rows
hold several tau values for one arm, lines are drawn per (arm, tau).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from spectra.errors import SpectraError
from spectra.results import Run, load_run, parse_ss_key, ss_key

#: Edit-success metrics, in panel order (CounterFact and ZsRE names; "score" is their harmonic mean), 0-100 scale.
EDIT_METRICS = (
    "efficacy", "paraphrase", "neighborhood", "score", "generalization", "specificity", "fluency", "consistency",
)

#: Weight-norm metrics per round, in panel order.
NORM_METRICS = ("fro_ratio", "delta_fro", "delta_spectral_rel", "functional_change", "spectral_norm", "condition_number",
                "effective_rank")

#: The drift overview's panels: (metric, task or None, side or None, how sites combine, title, log scale).
OVERVIEW_PANELS = (
    ("efficacy", None, None, "mean", "efficacy (%)", False),
    ("neighborhood", None, None, "mean", "neighbourhood (%)", False),
    ("accuracy", "mean", None, "mean", "general tasks (mean accuracy)", False),
    ("text_nll", "heldout_text", None, "mean", "held-out text NLL (nats/token)", False),
    ("LS", None, None, "mean", "LS (mean over sites)", False),
    ("SS_protected_diag_min", None, "right", "min", "SS diagonal, rank-ordered (min)", False),
    ("protected_triplet_residual", None, None, "max", "protected-triplet residual (max)", True),
    ("delta_spectral_rel", None, None, "max", "||dW||_2 / sigma_1(W0) (max)", True),
)
#: The overview panel that also draws sigma_k / sigma_1, past which LS and the SS diagonal stop reading W0.
DELTA_PANEL = next(panel[4] for panel in OVERVIEW_PANELS if panel[0] == "delta_spectral_rel")

#: Energy-spectrum metrics (size of the protected subspace per tau).
ENERGY_METRICS = ("k_over_rank", "k")

#: Sides of the sensitivity probe, in panel order.
SIDES = ("input", "output")

#: What figures are written as by default; ``spectra plot --pdf`` adds PDF (a vector copy costs ~20 s per run).
FORMATS = ("png",)

#: Most lines a figure labels one by one; beyond it, sites are coloured by layer with a colour bar.
MAX_LEGEND = 12

#: Site kinds in legend order: FFN first, then attention.
SITE_KIND_ORDER = ("mlp.up", "mlp.gate", "mlp.down", "attn.q", "attn.k", "attn.v", "attn.o")

#: Line styles of the site kinds when sites are coloured by layer.
KIND_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 3)))


class NoData(SpectraError):
    """The rows (or tensors) hold nothing this figure draws; ``plot_run`` skips such figures."""


@contextmanager
def style() -> Iterator[None]:
    """The one look of every spectra figure (seaborn whitegrid, paper context), set only inside the block."""
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1), matplotlib.rc_context(
        {"legend.frameon": False, "axes.titlesize": "medium", "image.cmap": "viridis"}
    ):
        yield


def save_figure(fig: Figure, directory: Path, name: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``directory/name.<fmt>`` per format (PNG by default; created as needed), release the figure, return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = directory / f"{name}.{fmt}"
        fig.savefig(path, dpi=150)  # constrained layout already fits the margins; "tight" would draw twice
        paths.append(path)
    pyplot = sys.modules.get("matplotlib.pyplot")  # only a pyplot-made figure is registered anywhere
    if pyplot is not None:
        pyplot.close(fig)
    return paths


def concentration_curve(rows: pd.DataFrame, baseline: bool = True) -> Figure:
    """Accuracy vs % of singular-value energy kept, one thin line per task and a thick mean (paper Fig. 2a).

    A task named "mean" is taken as the run's own task mean; otherwise the mean over tasks is
    drawn. With ``baseline``, the unmodified model (rows flagged ``baseline``, else fraction 100)
    is drawn dashed, so the share of ability recovered at 5 % can be read off directly.
    """
    data = _whole(_select(_experiment(rows, "concentration"), "accuracy", ("task",), "the concentration curve"))
    flagged = _flag(data, "baseline")
    curve = data[~flagged].dropna(subset=["fraction"]) if "fraction" in data.columns else data.iloc[:0]
    if curve.empty:
        raise NoData(_missing("the concentration curve", ("accuracy",), ("task", "fraction"), rows))
    curve = curve.assign(fraction=pd.to_numeric(curve["fraction"]))
    per_task = curve.groupby(["task", "fraction"], sort=True)["value"].mean().unstack("task")
    mean = per_task.pop("mean") if "mean" in per_task.columns else per_task.mean(axis=1)
    reference = data[flagged] if flagged.any() else curve[curve["fraction"] == 100]
    with style():
        fig = Figure(figsize=(5.2, 3.6), layout="constrained")
        ax = fig.add_subplot()
        colors = sns.color_palette("colorblind", per_task.shape[1])
        for color, task in zip(colors, per_task.columns):
            ax.plot(per_task.index, per_task[task], marker="o", ms=3, lw=1, alpha=0.8, color=color, label=str(task))
        ax.plot(mean.index, mean, color="black", lw=2.2, marker="o", ms=4, label="mean")
        if baseline and len(reference):
            ax.axhline(_task_mean(reference), color="0.4", ls="--", lw=1, label="unmodified")
        ax.set(xlabel="singular-value energy kept (%)", ylabel="accuracy", title="Concentration of general ability")
        ax.legend(fontsize="small")
    return fig


def sensitivity_by_group(rows: pd.DataFrame, n_groups: int | None = None) -> Figure:
    """Accuracy after perturbing each energy group, mean +- sd over seeds, one panel per side (Fig. 2b, 11) and one
    row of panels per perturbation strength ``eps`` when the run used several.

    Rows with ``group == -1`` are the unperturbed model and are drawn as a dashed line per task;
    groups are labelled "0-10%" ... "90-100%" for ``n_groups`` groups (default: inferred).
    """
    data = _whole(_select(_experiment(rows, "sensitivity"), "accuracy", ("group", "task"), "the sensitivity figure"))
    data = data.assign(group=pd.to_numeric(data["group"]).astype(int))
    unperturbed = (data["group"] < 0) | _flag(data, "baseline")
    base, probes = data[unperturbed], data[~unperturbed]
    if "side" not in probes.columns or probes["side"].isna().all():
        raise NoData("Cannot draw the sensitivity figure: its rows have no 'side' (input/output). Pass the rows of a sensitivity run.")
    probes = probes.dropna(subset=["side"])
    sides = _ordered(probes["side"].unique(), SIDES)
    strengths = _strengths(probes)
    groups = n_groups or int(probes["group"].max()) + 1
    labels = [f"{100 * g // groups}-{100 * (g + 1) // groups}%" for g in range(groups)]
    tasks = _ordered(data["task"].unique(), ())
    colors = {**dict(zip(tasks, sns.color_palette("colorblind", len(tasks)))), "mean": "black"}
    with style():
        fig = Figure(figsize=(4.6 * len(sides), 3.6 * len(strengths)), layout="constrained")
        grid = fig.subplots(len(strengths), len(sides), sharey=True, squeeze=False)
        for row, strength in zip(grid, strengths):
            chosen = probes if strength is None else probes[pd.to_numeric(probes["eps"]) == strength]
            for ax, side in zip(row, sides):
                _lines(ax, chosen[chosen["side"] == side], "group", "task", "sd", colors)
                for task in tasks:
                    reference = base[base["task"] == task]
                    if "side" in reference.columns:  # a baseline row may name its side or apply to both
                        reference = reference[reference["side"].isna() | (reference["side"] == side)]
                    if len(reference):
                        ax.axhline(reference["value"].mean(), color=colors[task], ls="--", lw=1)
                ax.set_xticks(range(groups), labels, rotation=45, ha="right")
                title = f"{side} side" if strength is None else f"{side} side, eps {strength:g}"
                ax.set(xlabel=f"perturbed {side} energy group", ylabel="accuracy", title=title)
        grid[0][0].legend(fontsize="small", title="dashed: unperturbed" if len(base) else None)
    return fig


def sensitivity_by_eps(rows: pd.DataFrame) -> Figure:
    """Mean task accuracy (and held-out NLL when measured) against the perturbation strength, a line per energy
    group from the top (dark) to the bottom (light), one panel per side: where the groups start to differ."""
    probes = _whole(_experiment(rows, "sensitivity"))
    if any(c not in probes.columns for c in ("eps", "side", "group", "task")) or probes["eps"].nunique() < 2:
        raise NoData("The curve over eps needs a sensitivity run with several --eps values.")
    probes = probes[~_flag(probes, "baseline") & (pd.to_numeric(probes["group"]) >= 0)]
    panels = [(metric, task, label) for metric, task, label in
              (("accuracy", "mean", "mean task accuracy"), ("text_nll", "heldout_text", "held-out NLL (nats/token)"))
              if ((probes["metric"] == metric) & (probes["task"] == task)).any()]
    if not panels:
        raise NoData("The curve over eps needs the sensitivity rows' mean accuracy or held-out NLL.")
    sides = _ordered(probes["side"].dropna().unique(), SIDES)
    groups = sorted(pd.to_numeric(probes["group"]).dropna().astype(int).unique())
    colors = dict(zip(groups, sns.color_palette("viridis", len(groups))))
    with style():
        fig = Figure(figsize=(4.6 * len(sides), 3.4 * len(panels)), layout="constrained")
        grid = fig.subplots(len(panels), len(sides), sharex=True, squeeze=False)
        for row, (metric, task, label) in zip(grid, panels):
            for ax, side in zip(row, sides):
                chosen = probes[(probes["metric"] == metric) & (probes["task"] == task) & (probes["side"] == side)]
                for group, part in chosen.groupby(pd.to_numeric(chosen["group"]).astype(int)):
                    stats = part.groupby(pd.to_numeric(part["eps"]))["value"].mean().sort_index()
                    ax.plot(stats.index, stats.values, marker="o", ms=3, color=colors[group], label=f"group {group}")
                ax.set_xscale("log")
                ax.set(xlabel="eps (share of ||W||_F)", ylabel=label, title=f"{side} side")
        grid[0][0].legend(fontsize="x-small", ncol=2, title="energy group (0 = top)")
        _suptitle(fig, "Sensitivity of each energy group against the perturbation strength")
    return fig


def _strengths(probes: pd.DataFrame) -> list[float | None]:
    """The distinct perturbation strengths of sensitivity rows, ascending; [None] when the rows do not say."""
    if "eps" not in probes.columns or probes["eps"].isna().all():
        return [None]
    return sorted(pd.to_numeric(probes["eps"]).dropna().unique())


def edit_metrics_by_round(rows: pd.DataFrame, metrics: Sequence[str] | None = None, ncols: int = 4) -> Figure:
    """Edit metrics and general ability per round, one panel per metric (and per task), a line per arm (Fig. 3).

    ``metrics`` defaults to the EDIT_METRICS present; general ability panels come from
    ``accuracy`` rows that carry a ``round`` and a ``task``.
    """
    panels: list[tuple[str, pd.DataFrame]] = []
    if "round" in rows.columns and "arm" in rows.columns:
        timed = rows.dropna(subset=["round", "arm"])
        wanted = metrics if metrics is not None else [m for m in EDIT_METRICS if (timed["metric"] == m).any()]
        panels += [(m, timed[timed["metric"] == m]) for m in wanted if (timed["metric"] == m).any()]
        if "task" in timed.columns:
            ability = timed[(timed["metric"] == "accuracy") & timed["task"].notna()]
            panels += [(f"{task} (accuracy)", ability[ability["task"] == task]) for task in _ordered(ability["task"].unique(), ("mean",))]
    if not panels:
        raise NoData(_missing("edit metrics by round", EDIT_METRICS + ("accuracy",), ("arm", "round"), rows))
    fig = _panels_by_round(panels, ncols, spread="sd", ylabel="score (%)", title="Editing and general ability per round")
    for ax, (name, _) in zip(fig.axes, panels):
        if name.endswith("(accuracy)"):
            ax.set_ylabel("accuracy")
    return fig


def drift_overview(rows: pd.DataFrame) -> Figure:
    """The drift run in one figure, a line per arm: edit success, general ability (tasks, held-out NLL),
    LS, the rank-ordered SS diagonal, REVIVE's protected-triplet residual and the update's spectral size.

    Sites combine as each panel's title says (mean, or the worst site: min of the SS diagonal, max
    of the residual and of ||dW||_2 / sigma_1); repeated rows (seeds) are then averaged with their sd shaded.
    """
    if not {"arm", "round", "metric"} <= set(rows.columns):
        raise NoData(_missing("drift overview", [p[0] for p in OVERVIEW_PANELS], ("arm", "round"), rows))
    timed = rows.dropna(subset=["arm", "round"])
    panels: list[tuple[str, pd.DataFrame]] = []
    log_panels: set[str] = set()
    for metric, task, side, combine, title, log in OVERVIEW_PANELS:
        part = timed[timed["metric"] == metric]
        if task is not None and "task" in part.columns:
            part = part[part["task"] == task]
        if side is not None and "side" in part.columns:
            part = part[part["side"] == side]
        if part.empty:
            continue
        keys = [c for c in ("arm", "tau", "round", "seed") if c in part.columns and part[c].notna().any()]
        part = part.groupby(keys, dropna=False, as_index=False)["value"].agg(combine)
        panels.append((title, part))
        if log:
            log_panels.add(title)
    if len(panels) < 2:
        raise NoData(_missing("drift overview", [p[0] for p in OVERVIEW_PANELS], ("arm", "round"), rows))
    fig = _panels_by_round(panels, ncols=4, spread="sd", ylabel=None, title="Sequential editing: behaviour and spectrum per round")
    for ax, (title, _) in zip(fig.axes, panels):
        ax.set_ylabel("")
        if title in log_panels:
            # symlog: round 0 is exactly 0 and REVIVE's residual sits at float round-off
            ax.set_yscale("symlog", linthresh=1e-4)
        if title == DELTA_PANEL and (timed["metric"] == "sigma_k_rel").any():
            limit = timed.loc[timed["metric"] == "sigma_k_rel", "value"].min()
            line = ax.axhline(limit, color="0.4", linestyle="--", linewidth=1,
                              label="min sigma_k/sigma_1: LS, SS informative below")
            ax.legend(handles=[line], loc="center right", fontsize="small")
    return fig


def ls_by_round(rows: pd.DataFrame, per_site: bool = False) -> Figure:
    """Low-rank subspace similarity LS per round, a line per arm (Fig. 4).

    By default one panel, the mean over sites with their min-max range shaded; ``per_site`` draws
    one panel per site instead.
    """
    data = _select(rows, "LS", ("arm", "round"), "LS by round")
    if per_site and "site" in data.columns:
        panels = [(str(site), data[data["site"] == site]) for site in _ordered(data["site"].unique(), ())]
    else:
        several_sites = "site" in data.columns and data["site"].nunique() > 1
        panels = [("LS (mean, range over sites)" if several_sites else "LS", data)]
    return _panels_by_round(panels, ncols=4, spread="range", ylabel="LS", title="Low-rank subspace similarity")


def norm_growth(rows: pd.DataFrame, metrics: Sequence[str] = NORM_METRICS) -> Figure:
    """Weight-norm diagnostics per round (Frobenius ratio, ||dW||_F, spectral norm, condition number, effective rank).

    One panel per metric present, a line per arm (mean over sites, range shaded); the condition
    number is shown on a log scale because it grows by orders of magnitude when a run collapses.
    """
    data = _select(rows, tuple(metrics), ("arm", "round"), "norm growth")
    panels = [(m, data[data["metric"] == m]) for m in metrics if (data["metric"] == m).any()]
    fig = _panels_by_round(panels, ncols=3, spread="range", ylabel=None, title="Weight norms per round")
    for ax, (metric, _) in zip(fig.axes, panels):
        if metric == "condition_number":
            ax.set_yscale("log")
    return fig


def tsne_scatter(rows: pd.DataFrame) -> Figure:
    """Pre- vs post-edit representations in 2-D, each prompt's pair linked by a thin line, one panel per arm (Fig. 10)."""
    required = ("prompt_idx", "phase", "x", "y")
    if not set(required) <= set(rows.columns):
        raise NoData(f"Cannot draw the t-SNE scatter: rows need columns {list(required)}; they have {list(rows.columns)}.")
    data = rows[rows["metric"] == "tsne"] if "metric" in rows.columns and (rows["metric"] == "tsne").any() else rows
    data = data.dropna(subset=list(required))
    if data.empty:
        raise NoData("Cannot draw the t-SNE scatter: no rows with prompt_idx, phase, x and y.")
    arms = _ordered(data["arm"].dropna().unique(), ("off",)) if "arm" in data.columns and data["arm"].notna().any() else [None]
    pre_color, post_color = sns.color_palette("colorblind", 2)
    with style():
        fig = Figure(figsize=(4.2 * len(arms), 4.0), layout="constrained")
        axes = fig.subplots(1, len(arms), squeeze=False)[0]
        for ax, arm in zip(axes, arms):
            part = data if arm is None else data[data["arm"] == arm]
            wide = part.pivot_table(index="prompt_idx", columns="phase", values=["x", "y"], aggfunc="first")
            pairs = wide.dropna()
            if {"pre", "post"} <= set(wide.columns.get_level_values("phase")) and len(pairs):
                segments = np.stack([pairs[[("x", "pre"), ("y", "pre")]].to_numpy(),
                                     pairs[[("x", "post"), ("y", "post")]].to_numpy()], axis=1)
                ax.add_collection(LineCollection(segments, colors="0.6", linewidths=0.4, alpha=0.6, zorder=1))
            for phase, color in (("pre", pre_color), ("post", post_color)):
                points = part[part["phase"] == phase]
                ax.scatter(points["x"], points["y"], s=8, color=color, alpha=0.8, label=f"{phase}-edit", zorder=2)
            ax.set(xticks=[], yticks=[], title="representations" if arm is None else str(arm))
        axes[0].legend(fontsize="small", markerscale=2)
    return fig


def tau_sweep(rows: pd.DataFrame, metrics: Sequence[str] | None = None, ncols: int = 4) -> Figure:
    """Final-round metrics vs the REVIVE energy threshold tau, the unfiltered arm as a dashed line (Fig. 8, 16).

    One panel per metric (per task for ``accuracy``); ``metrics`` defaults to the edit metrics and
    accuracy present. Rows whose tau is NaN or "off" are the unfiltered arm. When rows carry a
    ``round``, only each tau's last round is shown.
    """
    if "tau" not in rows.columns:
        raise NoData(f"Cannot draw the tau sweep: rows have no 'tau' column; they have {list(rows.columns)}.")
    data = rows.assign(tau=pd.to_numeric(rows["tau"], errors="coerce"))
    if "round" in data.columns and data["round"].notna().any():
        data = data.dropna(subset=["round"])
        last = data.groupby(data["tau"].fillna(-1.0))["round"].transform("max")
        data = data[data["round"] == last]
    if data["tau"].nunique() < 2:
        raise NoData("Cannot draw the tau sweep: it needs rows for at least two tau values.")
    wanted = metrics if metrics is not None else [*EDIT_METRICS, "accuracy"]
    panels: list[tuple[str, pd.DataFrame]] = []
    for metric in wanted:
        part = data[data["metric"] == metric]
        if "task" in part.columns and part["task"].notna().any():
            panels += [(f"{task} ({metric})", part[part["task"] == task]) for task in _ordered(part["task"].dropna().unique(), ("mean",))]
        elif len(part):
            panels.append((metric, part))
    if not panels:
        raise NoData(_missing("the tau sweep", tuple(wanted), ("tau",), rows))
    swept_all = data.dropna(subset=["tau"])
    # Colour by arm only when an arm spans several taus (several editors swept, say); a drift sweep
    # has one arm per tau ("revive@0.1", ...), which must form one line, not one dot per arm.
    spans = "arm" in swept_all.columns and swept_all.groupby("arm")["tau"].nunique().gt(1).any()
    hue = "arm" if spans else None
    arms = _ordered(swept_all[hue].dropna().unique(), ()) if hue else [None]
    palette = sns.color_palette("colorblind")
    off_color = palette[3]
    colors = dict(zip(arms, [c for i, c in enumerate(palette) if i != 3]))
    with style():
        fig, axes = _grid(len(panels), ncols, width=3.6, height=3.0)
        for ax, (label, part) in zip(axes, panels):
            _lines(ax, part.dropna(subset=["tau"]), "tau", hue, "sd", colors, label=None if hue else "REVIVE")
            off = part[part["tau"].isna()]
            if len(off):
                ax.axhline(off["value"].mean(), color=off_color, ls="--", lw=1.2, label="off")
            ax.set(xlabel="tau (energy threshold)", ylabel=label, title=label)
        axes[0].legend(fontsize="small")
        _suptitle(fig, "Sensitivity to the protection threshold tau")
    return fig


def causal_trace_curve(rows: pd.DataFrame) -> Figure:
    """P(true object) per layer with one clean state restored, a line per token position (ROME Fig. 1).

    Dashed lines mark the clean and the corrupted run: a restored state that climbs to the clean
    line carries the fact at that layer and position.
    """
    data = _select(rows, "trace_probability", ("position",), "the causal trace")
    curves = data.dropna(subset=["layer"])
    if curves.empty:
        raise NoData(_missing("the causal trace", ("trace_probability",), ("position", "layer"), rows))
    positions = _ordered(curves["position"].unique(), ("subject_last", "last"))
    colors = dict(zip(positions, sns.color_palette("colorblind", len(positions))))
    with style():
        fig = Figure(figsize=(5.2, 3.6), layout="constrained")
        ax = fig.add_subplot()
        _lines(ax, curves, "layer", "position", "range", colors)
        for name, shade in (("clean", "0.2"), ("corrupted", "0.6")):
            baseline = data[data["position"] == name]["value"]
            if len(baseline):
                ax.axhline(float(baseline.mean()), color=shade, ls="--", lw=1, label=name)
        ax.set(xlabel="block whose output is restored", ylabel="P(true object)", title="Causal trace")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    return fig


def energy_spectrum(rows: pd.DataFrame) -> Figure:
    """Size of the protected subspace per tau: k / rank (and k) per site, one panel per metric present.

    Up to ``MAX_LEGEND`` sites get a line colour each and a legend; more sites (every matrix of a
    real model) are coloured by layer with a colour bar, and drawn in one line style per kind
    (mlp.up, attn.q, ...) with a legend of the kinds.
    """
    data = _select(rows, ENERGY_METRICS, ("tau",), "the energy spectrum")
    data = data.assign(tau=pd.to_numeric(data["tau"], errors="coerce")).dropna(subset=["tau"])
    hue = "site" if "site" in data.columns and data["site"].notna().any() else None
    sites = _ordered(data[hue].dropna().unique(), ()) if hue else [None]
    by_layer = len(sites) > MAX_LEGEND
    colors = _layer_colors(sites) if by_layer else dict(zip(sites, sns.color_palette("colorblind", len(sites))))
    panels = [m for m in ENERGY_METRICS if (data["metric"] == m).any()]
    with style():
        fig, axes = _grid(len(panels), 2, width=4.2, height=3.4)
        for ax, metric in zip(axes, panels):
            part = data[data["metric"] == metric]
            if by_layer:
                _lines_by_kind(ax, part, "tau", colors)
            else:
                _lines(ax, part, "tau", hue, "range", colors)
            ax.set(xlabel="tau (energy threshold)", ylabel=metric, title="k / rank" if metric == "k_over_rank" else "k")
        if by_layer:
            _kind_legend_and_layer_bar(fig, axes, sites)
        elif hue:
            axes[0].legend(fontsize="small")
    return fig


def kind_comparison(rows: pd.DataFrame) -> Figure:
    """General ability with one site kind at a time rebuilt from its top energy (concentration) or perturbed in one
    energy group (sensitivity, a panel per side): a line per kind, FFN solid and attention dashed.

    Rows of ``--by-kind`` probe runs (a ``kind`` column), any number of them (seeds): repeated rows
    are averaged with their sd shaded. One row of panels per measure present: the tasks' mean
    accuracy and, for a model with held-out text, its NLL. The unchanged model is a grey dashed line.
    """
    probes = ("concentration", "sensitivity")
    if not {"kind", "experiment", "task"} <= set(rows.columns) or not (
            rows["kind"].notna() & rows["experiment"].isin(probes)).any():
        raise NoData("Cannot draw the kind comparison: it needs the rows of concentration or sensitivity runs made with "
                     "--by-kind (a kind column).")
    rows = rows[rows["experiment"].isin(probes)]
    measures = [(m, t, label) for m, t, label in (("accuracy", "mean", "mean accuracy"),
                                                  ("text_nll", "heldout_text", "held-out NLL (nats/token)"))
                if ((rows["metric"] == m) & (rows["task"] == t)).any()]
    per_kind = rows[rows["kind"].notna()]
    columns: list[tuple[str, str | None]] = [("concentration", None)] if (per_kind["experiment"] == "concentration").any() else []
    sensitivity = per_kind[per_kind["experiment"] == "sensitivity"]
    if len(sensitivity) and "side" in sensitivity.columns:
        columns += [("sensitivity", side) for side in _ordered(sensitivity["side"].dropna().unique(), SIDES)]
    if not measures or not columns:
        raise NoData(_missing("the kind comparison", ("accuracy", "text_nll"), ("kind", "experiment"), rows))
    kinds = _ordered(rows["kind"].dropna().unique(), SITE_KIND_ORDER)
    colors = dict(zip(kinds, sns.color_palette("colorblind", len(kinds))))
    styles = {kind: "--" if str(kind).startswith("attn.") else "-" for kind in kinds}
    with style():
        fig, axes = _grid(len(measures) * len(columns), len(columns), width=4.2, height=3.3)
        for i, (metric, task, label) in enumerate(measures):
            chosen = rows[(rows["metric"] == metric) & (rows["task"] == task)]
            for j, (experiment, side) in enumerate(columns):
                ax = axes[i * len(columns) + j]
                part = chosen[chosen["experiment"] == experiment]
                if side is not None:
                    part = part[(part["side"] == side) | part["kind"].isna()]
                x = "fraction" if experiment == "concentration" else "group"
                probes = part.dropna(subset=["kind", x])
                _lines(ax, probes, x, "kind", "sd", colors, styles=styles, first=SITE_KIND_ORDER)
                baseline = part[part["kind"].isna()]
                if len(baseline):
                    ax.axhline(float(baseline["value"].mean()), color="0.4", ls="--", lw=1, label="unchanged")
                title = "rebuilt from top energy" if side is None else f"{side} side perturbed"
                ax.set(xlabel="singular-value energy kept (%)" if x == "fraction" else "perturbed energy group",
                       ylabel=label, title=title)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].legend(fontsize="small")
        _suptitle(fig, "General ability by site kind: FFN (solid) and attention (dashed)")
    return fig


def capacity_curve(rows: pd.DataFrame) -> Figure:
    """Capacity of the protected complement: the efficacy of each round's own edits and the complement dimension
    left per round (a line per arm), and the edits absorbed before failure against the complement's dimension.

    Rows of ``spectra capacity`` runs (seeds averaged, sd shown). In the last panel each arm is one
    point at its mean complement_rank over sites; a hollow marker says the arm never failed within
    its budget, so its edits_absorbed is a lower bound.
    """
    needed = ("round_efficacy", "remaining_dim", "edits_absorbed", "complement_rank")
    if "metric" not in rows.columns or not set(needed) <= set(rows["metric"]) or "arm" not in rows.columns:
        raise NoData(_missing("the capacity figure", needed, ("arm", "round"), rows))
    timed = rows.dropna(subset=["arm", "round"])
    keys = [c for c in ("arm", "round", "seed") if c in timed.columns and timed[c].notna().any()]
    per_round = [(title, timed[timed["metric"] == metric].groupby(keys, as_index=False)["value"].mean())
                 for metric, title in (("round_efficacy", "efficacy of the round's own edits (%)"),
                                       ("efficacy", "efficacy on all edits so far (%)"),
                                       ("remaining_dim", "complement dimension left (mean over sites)"))
                 if (timed["metric"] == metric).any()]
    arms = _ordered(timed["arm"].unique(), ("off",))
    colors = dict(zip(arms, sns.color_palette("colorblind", len(arms))))
    points = _capacity_points(timed, [k for k in keys if k != "round"])
    with style():
        fig, axes = _grid(len(per_round) + 1, len(per_round) + 1, width=3.8, height=3.3)
        for ax, (title, part) in zip(axes, per_round):
            _lines(ax, part, "round", "arm", "sd", colors)
            ax.set(xlabel="round", ylabel="", title=title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax = axes[-1]
        for arm, point in points.groupby("arm", sort=False):
            mean, sd = point["absorbed"].mean(), point["absorbed"].std()
            failed = bool(point["reached"].min() == 1.0)
            ax.errorbar(point["complement"].mean(), mean, yerr=0.0 if np.isnan(sd) else sd, fmt="o", ms=7, capsize=3,
                        color=colors[arm], mfc=colors[arm] if failed else "white", label=str(arm))
        ax.set(xlabel="complement dimension min(m, n) - k", ylabel="edits absorbed",
               title="edits absorbed (hollow: budget ran out)")
        axes[0].legend(fontsize="small")
        _suptitle(fig, "Capacity of the protected complement")
    return fig


def _capacity_points(rows: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per arm (and seed): its complement dimension (mean over sites, round 0), last edits_absorbed and capacity_reached."""
    def last(metric: str) -> pd.Series:
        part = rows[rows["metric"] == metric].sort_values("round")
        return part.groupby(list(keys))["value"].last()

    complement = rows[(rows["metric"] == "complement_rank") & (rows["round"] == 0)].groupby(list(keys))["value"].mean()
    return pd.DataFrame({"complement": complement, "absorbed": last("edits_absorbed"),
                         "reached": last("capacity_reached")}).dropna(subset=["absorbed"]).reset_index()


def ss_heatmaps(tensors: Mapping[str, torch.Tensor], arm: str, side: str, rounds: Sequence[int], site: str,
                max_cols: int | None = None, ncols: int = 5) -> Figure:
    """SS matrices of one site over chosen rounds as a grid of heatmaps on a shared [0, 1] scale (Fig. 5, 12-14).

    Each matrix is k x r (dominant edited vectors x original vectors). Only the first
    ``max_cols`` columns are shown (default min(r, 2k)), so the diagonal stays visible.
    """
    keys = [ss_key(side, arm, r, site) for r in rounds]
    missing = [k for k in keys if k not in tensors]
    if missing or not keys:
        stored = sorted(r for s, a, r, t in filter(None, map(parse_ss_key, tensors)) if (s, a, t) == (side, arm, site))
        raise NoData(
            f"Cannot draw SS heatmaps: no SS matrix for {', '.join(missing) or 'any round'}. Rounds stored for "
            f"side={side}, arm={arm}, site={site}: {stored or 'none'}. Choose among those."
        )
    with style():
        fig, axes = _grid(len(keys), ncols, width=2.6, height=2.4)
        image = None
        for ax, round_, key in zip(axes, rounds, keys):
            matrix = tensors[key].detach().float().cpu().numpy()
            cols = max_cols or min(matrix.shape[1], 2 * matrix.shape[0])
            image = ax.imshow(matrix[:, :cols], vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            ax.grid(False)
            ax.set(title=f"SS$_{{{round_}}}$", xlabel="original vector j", ylabel="edited vector i")
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="|cos|")
        _suptitle(fig, f"Singular vector similarity ({side} vectors), {arm}, {site}")
    return fig


def ss_heatmap(run: Run, arm: str = "off", side: str = "right", site: str | None = None,
               rounds: Sequence[int] | None = None, max_panels: int = 10) -> Figure:
    """The SS heatmaps of one arm of a drift run, straight from the run (``spectra.load_run(DIR)``).

    ``site`` defaults to the site whose LS fell furthest in the ``off`` arm (the edited matrix that
    drifted most; the first stored site without LS rows); ``rounds`` to at most ``max_panels``
    evenly spaced stored rounds after round 0 (round 0 compares W_0 with itself).
    """
    stored = run.ss_index()
    if stored.empty:
        raise NoData(f"The run {run.path} holds no SS matrices; they are written by `spectra drift`.")
    if site is None:
        sites = set(stored["site"])
        rows = run.rows
        ls_rows = rows[(rows["metric"] == "LS") & (rows["arm"] == "off") & rows["site"].isin(sites)] \
            if {"arm", "site"} <= set(rows.columns) else rows.iloc[:0]
        site = (str(ls_rows.sort_values("round").groupby("site")["value"].last().idxmin()) if len(ls_rows)
                else sorted(sites)[0])
    if rounds is None:
        available = run.ss_rounds(arm, side, site)
        later = [r for r in available if r > 0] or available
        picks = np.unique(np.linspace(0, len(later) - 1, min(max_panels, len(later))).round().astype(int)) if later else []
        rounds = [later[i] for i in picks]
    return ss_heatmaps({ss_key(side, arm, r, site): run.ss(arm, side, r, site) for r in rounds}, arm, side, list(rounds), site)


def _site_parts(site: str) -> tuple[str, int]:
    """(kind, layer) of a site name ``kind@layer`` (layer -1 when the name has none)."""
    kind, _, layer = str(site).partition("@")
    return kind, int(layer) if layer.isdigit() else -1


def _layer_colors(sites: Sequence[str]) -> dict[str, tuple]:
    """A viridis colour per site by its layer (first layer dark, last bright)."""
    layers = [_site_parts(site)[1] for site in sites]
    low, high = min(layers), max(layers)
    cmap = matplotlib.colormaps["viridis"]
    return {site: cmap(0.0 if high == low else (layer - low) / (high - low)) for site, layer in zip(sites, layers)}


def _lines_by_kind(ax: Axes, data: pd.DataFrame, x: str, colors: Mapping[str, tuple]) -> None:
    """One thin line per site, coloured by ``colors`` (by layer) and styled by its kind."""
    kinds = sorted({_site_parts(site)[0] for site in colors})
    for site, part in data.groupby("site", sort=False):
        stats = part.groupby(pd.to_numeric(part[x]))["value"].mean().sort_index()
        style_ = KIND_STYLES[kinds.index(_site_parts(site)[0]) % len(KIND_STYLES)]
        ax.plot(stats.index, stats.values, lw=1, alpha=0.85, color=colors[site], linestyle=style_)


def _kind_legend_and_layer_bar(fig: Figure, axes: Sequence[Axes], sites: Sequence[str]) -> None:
    """A legend of the kinds' line styles on the first panel and one colour bar of the layers beside all panels."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    kinds = sorted({_site_parts(site)[0] for site in sites})
    handles = [Line2D([], [], color="0.2", lw=1.2, linestyle=KIND_STYLES[i % len(KIND_STYLES)], label=kind)
               for i, kind in enumerate(kinds)]
    axes[0].legend(handles=handles, fontsize="small", title="kind")
    layers = [_site_parts(site)[1] for site in sites]
    mappable = ScalarMappable(Normalize(min(layers), max(layers)), matplotlib.colormaps["viridis"])
    bar = fig.colorbar(mappable, ax=list(axes), shrink=0.9, label="layer")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()


def _suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width, so that a narrow figure (one SS panel) never clips it."""
    import textwrap

    chars = max(20, int(fig.get_figwidth() * 72 / (0.62 * matplotlib.rcParams["font.size"] * 1.2)))
    fig.suptitle(textwrap.fill(text, chars))


def plot_run(run_dir: Path, ss_rounds: int = 10, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Redraw every figure the run's rows and tensors support into ``run_dir/figures/``; returns the files written.

    Needs only the run directory (never the model). Figures whose data the run lacks are
    skipped; SS heatmaps are drawn per (side, arm, site) over at most ``ss_rounds`` evenly
    spaced rounds.
    """
    run = load_run(run_dir)
    written: list[Path] = []
    drawers = (
        ("concentration", concentration_curve), ("sensitivity", sensitivity_by_group),
        ("sensitivity_by_eps", sensitivity_by_eps),
        ("drift_overview", drift_overview), ("edit_metrics", edit_metrics_by_round), ("ls", ls_by_round),
        ("norm_growth", norm_growth),
        ("tsne", tsne_scatter), ("tau_sweep", tau_sweep), ("energy_spectrum", energy_spectrum),
        ("causal_trace", causal_trace_curve), ("kind_comparison", kind_comparison), ("capacity", capacity_curve),
    )
    for name, draw in drawers:
        try:
            fig = draw(run.rows)
        except NoData:
            continue
        written += save_figure(fig, run.figures_dir, name, formats)
    series: dict[tuple[str, str, str], list[int]] = {}
    for side, arm, round_, site in filter(None, map(parse_ss_key, run.tensors)):
        series.setdefault((side, arm, site), []).append(round_)
    for (side, arm, site), rounds in sorted(series.items()):
        rounds = sorted(rounds)
        chosen = sorted({rounds[i] for i in np.linspace(0, len(rounds) - 1, min(ss_rounds, len(rounds))).round().astype(int)})
        fig = ss_heatmaps(run.tensors, arm, side, chosen, site)
        written += save_figure(fig, run.figures_dir, f"ss_{side}_{arm}_{_slug(site)}", formats)
    return written


def _select(rows: pd.DataFrame, metric: str | Sequence[str], required: Sequence[str], figure: str) -> pd.DataFrame:
    """Rows of ``metric`` that carry every ``required`` column; NoData naming what is there when none do."""
    metrics = (metric,) if isinstance(metric, str) else tuple(metric)
    if "metric" not in rows.columns or not set(required) <= set(rows.columns):
        raise NoData(_missing(figure, metrics, required, rows))
    data = rows[rows["metric"].isin(metrics)].dropna(subset=list(required))
    if data.empty:
        raise NoData(_missing(figure, metrics, required, rows))
    return data


def _whole(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` unless they hold per-kind probes (``--by-kind``), which kind_comparison draws instead."""
    if "kind" in rows.columns and rows["kind"].notna().any():
        raise NoData("These probe rows change one site kind at a time (--by-kind); kind_comparison draws them.")
    return rows


def _experiment(rows: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of experiment ``name`` when the table says which experiment each row is from, else all rows."""
    if "experiment" in rows.columns and (rows["experiment"] == name).any():
        return rows[rows["experiment"] == name]
    return rows


def _flag(rows: pd.DataFrame, column: str) -> pd.Series:
    """A boolean column read back from CSV (True/False/1/0/NaN) as a plain boolean mask; all False when absent."""
    if column not in rows.columns:
        return pd.Series(False, index=rows.index)
    return rows[column].astype(str).str.lower().isin(("true", "1", "1.0"))


def _task_mean(rows: pd.DataFrame) -> float:
    """The run's own "mean" task when present, else the mean of the per-task means."""
    if (rows["task"] == "mean").any():
        return float(rows.loc[rows["task"] == "mean", "value"].mean())
    return float(rows.groupby("task")["value"].mean().mean())


def _missing(figure: str, metrics: Sequence[str], required: Sequence[str], rows: pd.DataFrame) -> str:
    present = sorted(map(str, rows["metric"].dropna().unique())) if "metric" in rows.columns else []
    return (
        f"Cannot draw {figure}: no rows with metric in {list(metrics)} that carry columns {list(required)}. "
        f"The rows have metrics {present} and columns {list(rows.columns)}. Pass the rows of a run of the "
        "experiment that measures it."
    )


def _ordered(values: Sequence[object] | np.ndarray, first: Sequence[object]) -> list:
    """Distinct values, those in ``first`` leading in that order, the rest sorted (stable colors across figures)."""
    values = [v for v in values if not (isinstance(v, float) and np.isnan(v))]
    return [v for v in first if v in values] + sorted((v for v in values if v not in first), key=str)


def _line_labels(data: pd.DataFrame) -> pd.Series:
    """One label per line: the arm, plus its tau when that arm was run with several taus."""
    arms = data["arm"].astype(str)
    if "tau" not in data.columns:
        return arms
    tau = pd.to_numeric(data["tau"], errors="coerce")
    several = tau.groupby(arms).transform("nunique") > 1
    return arms.where(~several, arms + " (tau=" + tau.map("{:g}".format) + ")")


def _panels_by_round(panels: list[tuple[str, pd.DataFrame]], ncols: int, spread: str, ylabel: str | None,
                     title: str) -> Figure:
    """A grid with one panel per (title, rows) pair, value vs round, one line per arm (and tau)."""
    labelled = [(name, part.assign(_line=_line_labels(part), round=pd.to_numeric(part["round"]))) for name, part in panels]
    lines = _ordered(pd.concat([p["_line"] for _, p in labelled]).unique(), ("off",))
    colors = dict(zip(lines, sns.color_palette("colorblind", len(lines))))
    with style():
        fig, axes = _grid(len(labelled), ncols, width=3.6, height=3.0)
        for ax, (name, part) in zip(axes, labelled):
            _lines(ax, part, "round", "_line", spread, colors)
            ax.set(xlabel="round", ylabel=ylabel or name, title=name)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].legend(fontsize="small")
        _suptitle(fig, title)
    return fig


def _lines(ax: Axes, data: pd.DataFrame, x: str, hue: str | None, spread: str, colors: Mapping,
           label: str | None = None, styles: Mapping | None = None, first: Sequence[object] = ("off",)) -> None:
    """One line per ``hue`` value (in ``first``'s order, then sorted): mean ``value`` of repeated rows at each x,
    shaded by sd or min-max range; ``styles`` gives a line style per value (default solid)."""
    keys = _ordered(data[hue].unique(), first) if hue else [None]
    for key in keys:
        part = data if hue is None else data[data[hue] == key]
        stats = part.groupby(pd.to_numeric(part[x]))["value"].agg(["mean", "std", "min", "max", "count"]).sort_index()
        color = colors.get(key)
        ax.plot(stats.index, stats["mean"], marker="o", ms=3, lw=1.5, color=color, label=label or str(key),
                linestyle=(styles or {}).get(key, "-"))
        if (stats["count"] > 1).any():
            if spread == "sd":
                low, high = stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0)
            else:
                low, high = stats["min"], stats["max"]
            ax.fill_between(stats.index, low, high, color=color, alpha=0.2, linewidth=0)


def _grid(n: int, ncols: int, width: float, height: float) -> tuple[Figure, list[Axes]]:
    """A figure with exactly ``n`` axes laid out ``ncols`` wide (no empty panels)."""
    cols = max(1, min(n, ncols))
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    grid = fig.add_gridspec(rows, cols)
    return fig, [fig.add_subplot(grid[i // cols, i % cols]) for i in range(n)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
