"""Figures from tidy rows: the expected panels and lines, nothing clipped, PNG (PDF on request); plot_run redraws a run."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from spectra import plots  # noqa: E402
from spectra.results import create_run, ss_key  # noqa: E402

TASKS = ("sst2", "mrpc")
ARMS = ("off", "revive")
SITES = ("mlp.down@1", "mlp.down@2")


def _frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records)


def concentration_rows() -> pd.DataFrame:
    """Shaped as the concentration experiment writes them: a "mean" task and flagged unmodified-model rows."""
    curve = [{"experiment": "concentration", "task": t, "fraction": f, "baseline": False, "metric": "accuracy", "value": f / 100}
             for t, f in itertools.product((*TASKS, "mean"), (5, 25, 50, 100))]
    base = [{"experiment": "concentration", "task": t, "baseline": True, "metric": "accuracy", "value": 0.95}
            for t in (*TASKS, "mean")]
    return _frame(curve + base)


def sensitivity_rows() -> pd.DataFrame:
    probes = [{"experiment": "sensitivity", "side": s, "group": g, "seed": seed, "task": t, "metric": "accuracy",
               "value": 0.5 + 0.04 * g + 0.01 * seed}
              for s, g, seed, t in itertools.product(("input", "output"), range(10), range(3), TASKS)]
    base = [{"experiment": "sensitivity", "group": -1, "baseline": True, "task": t, "metric": "accuracy", "value": 0.9}
            for t in TASKS]
    return _frame(probes + base)


def drift_rows(edit: tuple[str, ...] = ("efficacy", "paraphrase", "neighborhood"), tasks: tuple[str, ...] = TASKS,
               norms: tuple[str, ...] = plots.NORM_METRICS) -> pd.DataFrame:
    records = []
    for arm, r in itertools.product(ARMS, range(4)):
        decay = 0.0 if arm == "revive" else 10.0 * r
        records += [{"arm": arm, "round": r, "metric": m, "value": 100 - decay} for m in edit]
        records += [{"arm": arm, "round": r, "task": t, "metric": "accuracy", "value": 0.8 - decay / 100} for t in tasks]
        for site in SITES:
            records += [{"arm": arm, "round": r, "site": site, "metric": "LS", "value": 1 - decay / 50}]
            records += [{"arm": arm, "round": r, "site": site, "metric": m, "value": 1 + r} for m in norms]
    return _frame(records)


def tsne_rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return _frame([{"arm": arm, "prompt_idx": i, "phase": phase, "x": rng.normal(), "y": rng.normal(), "metric": "tsne", "value": np.nan}
                   for arm, i, phase in itertools.product(ARMS, range(20), ("pre", "post"))])


def tau_rows() -> pd.DataFrame:
    records = [{"arm": "revive", "tau": tau, "round": r, "metric": "efficacy", "value": 90 * tau}
               for tau, r in itertools.product((0.5, 0.7, 0.9), (1, 2))]
    records += [{"arm": "off", "tau": np.nan, "round": 2, "metric": "efficacy", "value": 20.0}]
    records += [{"arm": "revive", "tau": tau, "round": 2, "task": t, "metric": "accuracy", "value": tau}
                for tau, t in itertools.product((0.5, 0.9), TASKS)]
    records += [{"arm": "off", "tau": "off", "round": 2, "task": t, "metric": "accuracy", "value": 0.1} for t in TASKS]
    return _frame(records)


def energy_rows() -> pd.DataFrame:
    return _frame([{"tau": tau, "site": site, "metric": m, "value": tau * (100 if m == "k" else 1)}
                   for tau, site, m in itertools.product((0.5, 0.9), SITES, ("k", "k_over_rank"))])


def ss_tensors() -> dict[str, torch.Tensor]:
    return {ss_key("right", "off", r, "mlp.down@2"): torch.rand(4, 40) for r in range(0, 12, 2)}


def _data_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


@pytest.mark.parametrize(
    ("draw", "n_axes", "n_lines"),
    [
        (lambda: plots.concentration_curve(concentration_rows()), 1, [2 + 1 + 1]),
        (lambda: plots.sensitivity_by_group(sensitivity_rows()), 2, [4, 4]),
        (lambda: plots.edit_metrics_by_round(drift_rows()), 5, [2] * 5),
        (lambda: plots.ls_by_round(drift_rows()), 1, [2]),
        (lambda: plots.ls_by_round(drift_rows(), per_site=True), 2, [2, 2]),
        (lambda: plots.norm_growth(drift_rows()), len(plots.NORM_METRICS), [2] * len(plots.NORM_METRICS)),
        (lambda: plots.tau_sweep(tau_rows()), 3, [2, 2, 2]),
        (lambda: plots.energy_spectrum(energy_rows()), 2, [2, 2]),
    ],
    ids=["concentration", "sensitivity", "edit_metrics", "ls", "ls_per_site", "norms", "tau_sweep", "energy"],
)
def test_line_figures(draw, n_axes: int, n_lines: list[int], tmp_path: Path) -> None:
    """Each line figure has one panel per metric/side/task and one line per task/arm/site (+ dashed references)."""
    fig = draw()
    assert isinstance(fig, Figure)
    axes = _data_axes(fig)
    assert len(axes) == n_axes
    assert [len(ax.get_lines()) for ax in axes] == n_lines
    assert [p.name for p in plots.save_figure(fig, tmp_path / "figures", "fig")] == ["fig.png"], "PNG by default"
    paths = plots.save_figure(fig, tmp_path / "figures", "fig", formats=("png", "pdf"))
    assert [p.name for p in paths] == ["fig.png", "fig.pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_drift_overview_draws_every_panel_and_combines_sites_by_the_worst_one() -> None:
    """Eight panels, a line per arm; the SS diagonal takes the worst (min) site and the residual the max site."""
    extra = []
    for arm, r in itertools.product(ARMS, range(4)):
        extra += [{"arm": arm, "round": r, "task": "mean", "metric": "accuracy", "value": 0.9},
                  {"arm": arm, "round": r, "task": "heldout_text", "metric": "text_nll", "value": 2.0 + r}]
        for i, site in enumerate(SITES):
            extra += [{"arm": arm, "round": r, "site": site, "side": side, "metric": "SS_protected_diag_min",
                       "value": 0.5 + 0.25 * i} for side in ("right", "left")]
            extra += [{"arm": arm, "round": r, "site": site, "metric": "protected_triplet_residual", "value": 10.0 ** (i - 3)}]
    fig = plots.drift_overview(pd.concat([drift_rows(), _frame(extra)], ignore_index=True))
    axes = _data_axes(fig)
    assert [ax.get_title() for ax in axes] == [p[4] for p in plots.OVERVIEW_PANELS]
    assert all(len(ax.get_lines()) == 2 for ax in axes)
    ss_panel, residual_panel = axes[5], axes[6]
    assert set(ss_panel.get_lines()[0].get_ydata()) == {0.5}
    assert set(residual_panel.get_lines()[0].get_ydata()) == {0.01} and residual_panel.get_yscale() == "symlog"
    with pytest.raises(plots.NoData):
        plots.drift_overview(concentration_rows())


def test_drift_overview_marks_where_ls_and_ss_stop_reading_w0() -> None:
    """With sigma_k_rel recorded, the update panel draws a dashed line at the smallest sigma_k / sigma_1 over sites."""
    limits = [{"arm": arm, "round": 0, "site": site, "metric": "sigma_k_rel", "value": value}
              for arm in ARMS for site, value in zip(SITES, (0.7, 0.6))]
    fig = plots.drift_overview(pd.concat([drift_rows(), _frame(limits)], ignore_index=True))
    panel = next(ax for ax in _data_axes(fig) if ax.get_title() == plots.DELTA_PANEL)
    dashed = [line for line in panel.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and set(dashed[0].get_ydata()) == {0.6}
    assert [t.get_text() for t in panel.get_legend().get_texts()] == [dashed[0].get_label()]
    without = plots.drift_overview(drift_rows())
    assert not any(line.get_linestyle() == "--" for ax in _data_axes(without) for line in ax.get_lines())


def test_sensitivity_labels_groups() -> None:
    """Energy groups are labelled by their energy range."""
    ax = plots.sensitivity_by_group(sensitivity_rows()).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "0-10%" and labels[-1] == "90-100%"


def sensitivity_rows_over_eps() -> pd.DataFrame:
    """Two strengths: at eps 0.1 no group matters; at eps 1 the top group (0) costs the most, the bottom nothing."""
    rows = [{"experiment": "sensitivity", "side": s, "group": g, "seed": 0, "eps": eps, "task": "mean",
             "metric": "accuracy", "value": 1.0 if eps == 0.1 else 0.5 + 0.05 * g}
            for s, g, eps in itertools.product(("input", "output"), range(10), (0.1, 1.0))]
    base = [{"experiment": "sensitivity", "group": -1, "baseline": True, "task": "mean", "metric": "accuracy",
             "value": 1.0}]
    return _frame(rows + base)


def test_several_strengths_give_a_row_of_panels_each_and_the_curve_over_eps() -> None:
    """A sensitivity run over several eps: one row of side panels per eps, and the curve of each group over eps."""
    rows = sensitivity_rows_over_eps()
    by_group = plots.sensitivity_by_group(rows)
    titles = [ax.get_title() for ax in by_group.axes]
    assert titles == ["input side, eps 0.1", "output side, eps 0.1", "input side, eps 1", "output side, eps 1"]
    assert set(by_group.axes[2].get_lines()[0].get_ydata()) == {0.5 + 0.05 * g for g in range(10)}
    curve = plots.sensitivity_by_eps(rows)
    lines = curve.axes[0].get_lines()
    assert len(lines) == 10 and curve.axes[0].get_xscale() == "log"
    assert list(lines[0].get_xdata()) == [0.1, 1.0] and list(lines[0].get_ydata()) == [1.0, 0.5]
    assert list(lines[9].get_ydata()) == [1.0, 0.95]
    with pytest.raises(plots.NoData, match="several --eps"):
        plots.sensitivity_by_eps(rows[rows["eps"] != 1.0])


def test_concentration_uses_run_mean_and_baseline_rows() -> None:
    """The run's own "mean" task is the thick line, and flagged baseline rows give the dashed line."""
    ax = plots.concentration_curve(concentration_rows()).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["mrpc", "sst2", "mean", "unmodified"] and ax.get_lines()[-1].get_ydata()[0] == 0.95


def test_tau_sweep_uses_final_round_and_off_line() -> None:
    """Only the last round per tau is drawn, and the unfiltered arm is the dashed horizontal line."""
    ax = plots.tau_sweep(tau_rows()).axes[0]
    swept, off = ax.get_lines()
    assert list(swept.get_xdata()) == [0.5, 0.7, 0.9] and off.get_ydata()[0] == 20.0


def test_tau_sweep_of_a_drift_run_joins_one_arm_per_tau_into_one_line() -> None:
    """``spectra drift --tau a,b,c`` names its arms revive@a, revive@b, ...: one line through all taus."""
    rows = tau_rows()
    rows.loc[rows["arm"] == "revive", "arm"] = rows["tau"].map(lambda t: f"revive@{t}")
    swept, off = plots.tau_sweep(rows).axes[0].get_lines()
    assert list(swept.get_xdata()) == [0.5, 0.7, 0.9] and off.get_ydata()[0] == 20.0


def test_tsne_scatter_links_pairs(tmp_path: Path) -> None:
    """One panel per arm with pre and post points and one link per prompt."""
    fig = plots.tsne_scatter(tsne_rows())
    assert len(fig.axes) == 2
    links = fig.axes[0].collections[0]
    assert len(links.get_segments()) == 20 and len(fig.axes[0].collections) == 3
    plots.save_figure(fig, tmp_path, "tsne")


def test_ss_heatmaps_grid_and_columns(tmp_path: Path) -> None:
    """One heatmap per round plus a colorbar, showing the first min(r, 2k) columns; a missing round is named."""
    fig = plots.ss_heatmaps(ss_tensors(), "off", "right", [2, 6, 10], "mlp.down@2")
    axes = _data_axes(fig)
    assert len(axes) == 3 and len(fig.axes) == 4
    assert axes[0].get_images()[0].get_array().shape == (4, 8)
    plots.save_figure(fig, tmp_path, "ss")
    with pytest.raises(plots.NoData, match=r"\[0, 2, 4, 6, 8, 10\]"):
        plots.ss_heatmaps(ss_tensors(), "off", "right", [3], "mlp.down@2")


def test_missing_data_is_a_clear_error() -> None:
    """A figure asked of rows that lack its metric says which metrics the rows hold."""
    with pytest.raises(plots.NoData, match=r"metrics \['accuracy'\]"):
        plots.ls_by_round(concentration_rows())


def test_style_is_not_global() -> None:
    """Drawing does not leave the seaborn style in matplotlib's global settings."""
    before = dict(matplotlib.rcParams)
    plots.ls_by_round(drift_rows())
    assert dict(matplotlib.rcParams) == before


def test_plot_run_redraws_every_supported_figure(tmp_path: Path) -> None:
    """plot_run draws exactly the figures the run's rows and tensors support, as PNG (PDF only when asked)."""
    drift = drift_rows(edit=("efficacy",), tasks=(), norms=("fro_ratio",))  # few panels: this test is about choosing
    rows = pd.concat([concentration_rows(), sensitivity_rows(), drift, tsne_rows(), energy_rows()], ignore_index=True)
    with create_run("all", {"seed": 0}, root=tmp_path) as writer:
        writer.add_rows(rows)
        writer.add_tensors(ss_tensors())
    written = plots.plot_run(writer.path)
    names = {p.stem for p in written}
    assert names == {"concentration", "sensitivity", "drift_overview", "edit_metrics", "ls", "norm_growth", "tsne",
                     "energy_spectrum", "ss_right_off_mlp.down-2"}
    assert len(written) == len(names) and all(p.suffix == ".png" and p.parent == writer.path / "figures" and p.exists()
                                              for p in written)


def _clipped_texts(fig: Figure) -> list[str]:
    """Every title, axis label and legend text of a drawn figure that reaches beyond its edges."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig.bbox
    renderer = canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        texts += ax.get_legend().get_texts() if ax.get_legend() is not None else []
    outside = []
    for text in texts:
        if not (text.get_visible() and text.get_text().strip()):
            continue
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1 or extent.y0 < box.y0 - 1 or extent.y1 > box.y1 + 1:
            outside.append(text.get_text())
    return outside


def many_site_energy_rows() -> pd.DataFrame:
    """A real model's spectrum run: seven kinds in each of six layers, 42 lines per panel."""
    kinds = ("mlp.up", "mlp.gate", "mlp.down", "attn.q", "attn.k", "attn.v", "attn.o")
    return _frame([{"tau": tau, "site": f"{kind}@{layer}", "metric": m, "value": tau * (1 + layer / 10)}
                   for tau, kind, layer, m in itertools.product((0.1, 0.5), kinds, range(6), ("k", "k_over_rank"))])


def test_many_sites_are_coloured_by_layer_with_a_kind_legend_and_no_title_is_clipped() -> None:
    fig = plots.energy_spectrum(many_site_energy_rows())
    axes = _data_axes(fig)
    assert [len(ax.get_lines()) for ax in axes] == [42, 42]
    legend = axes[0].get_legend()
    assert legend is not None and len(legend.get_texts()) == 7, "one legend entry per kind, not per site"
    assert any(ax.get_label() == "<colorbar>" and ax.get_ylabel() == "layer" for ax in fig.axes)
    one_round = plots.ss_heatmaps(ss_tensors(), "off", "right", [2], "mlp.down@2")
    figures = {"energy (42 sites)": fig, "ss (one round)": one_round,
               "ss": plots.ss_heatmaps(ss_tensors(), "off", "right", [0, 2, 4], "mlp.down@2"),
               "edit metrics": plots.edit_metrics_by_round(drift_rows()), "energy": plots.energy_spectrum(energy_rows())}
    for name, figure in figures.items():
        assert _clipped_texts(figure) == [], name


def test_a_run_gives_its_rounds_and_ss_matrices_and_draws_them_in_one_call(tmp_path: Path) -> None:
    """spectra.load_run(DIR).ss(...) / .rounds() and spectra.plots.ss_heatmap(run): no tensor names to parse."""
    import spectra
    from spectra.errors import SpectraError

    with create_run("drift", {"seed": 0}, root=tmp_path) as writer:
        writer.add_rows(drift_rows())
        writer.add_tensors(ss_tensors())
    run = spectra.load_run(writer.path)
    assert run.rounds() == [0, 1, 2, 3] and run.ss_rounds("off", "right") == [0, 2, 4, 6, 8, 10]
    assert tuple(run.ss("off", "right", 4, "mlp.down@2").shape) == (4, 40)
    with pytest.raises(SpectraError, match=r"rounds \[0, 2, 4, 6, 8, 10\]"):
        run.ss("off", "right", 3, "mlp.down@2")
    fig = spectra.plots.ss_heatmap(run, arm="off", max_panels=3)
    assert [ax.get_title() for ax in _data_axes(fig)] == ["SS$_{2}$", "SS$_{6}$", "SS$_{10}$"], "round 0 is left out"
