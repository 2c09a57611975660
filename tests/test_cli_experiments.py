"""End-to-end: every command through typer's runner on a few-step tiny-world model, plus resume and errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from spectra.glossary import GLOSSARY
from spectra.results import load_run
from spectra_cli.main import app

runner = CliRunner()


def invoke(*args: str) -> object:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def run_dir_of(output: str) -> Path:
    line = next(line for line in output.splitlines() if line.startswith("run directory:"))
    return Path(line.split(":", 1)[1].strip())


def test_models_and_help_list_every_command():
    result = invoke("--help")
    for command in ("models", "spectrum", "concentration", "sensitivity", "trace", "editability", "drift", "plot", "data",
                    "train-tiny"):
        assert command in result.output
    drift_help = " ".join(invoke("drift", "--help").output.split())
    assert "[default: runs/<time>-<command>]" in drift_help, "option defaults must show in --help"
    assert "tiny" in invoke("models").output


def test_trace_writes_a_restoration_curve_per_position(world_model, tmp_path):
    out = tmp_path / "trace"
    result = invoke("trace", "--model", str(world_model), "--facts", "4", "--out", str(out))
    assert "clean" in result.output and "subject_last" in result.output
    rows = load_run(out).rows
    assert set(rows["metric"]) <= set(GLOSSARY) and rows["unit"].notna().all()
    curves = rows.dropna(subset=["layer"])
    assert set(curves["position"]) == {"subject_last", "last"} and curves["layer"].nunique() == 4
    assert (out / "figures" / "causal_trace.png").exists()
    base = rows[rows["layer"].isna()].set_index("position")["value"]
    probability = curves[curves["metric"] == "trace_probability"].set_index(["position", "layer"])["value"]
    recovery = curves[curves["metric"] == "trace_recovery"].set_index(["position", "layer"])["value"]
    if base["clean"] > base["corrupted"]:
        expected = (probability - base["corrupted"]) / (base["clean"] - base["corrupted"])
        pd.testing.assert_series_equal(recovery.sort_index(), expected.sort_index(), check_names=False)
        assert "share of the clean-corrupted gap" in result.output
    else:
        assert recovery.empty
    bad = runner.invoke(app, ["trace", "--model", str(world_model), "--facts", "0"])
    assert bad.exit_code == 2 and "--facts must be at least 1" in bad.output


def test_spectrum_writes_rows_for_every_site(world_model, tmp_path):
    out = tmp_path / "spectrum"
    invoke("spectrum", "--model", str(world_model), "--sites", "mlp.down,mlp.up@0", "--out", str(out))
    rows = load_run(out).rows
    assert set(rows["site"]) == {"mlp.down@0", "mlp.down@1", "mlp.down@2", "mlp.down@3", "mlp.up@0"}
    assert set(rows["metric"]) <= set(GLOSSARY) and rows["unit"].notna().all()
    k = rows[(rows["metric"] == "k_over_rank") & (rows["tau"] == 0.1)]
    assert ((k["value"] > 0) & (k["value"] <= 1)).all()


def test_concentration_restores_weights_and_draws_its_figure(world_model, tmp_path):
    out = tmp_path / "concentration"
    invoke("concentration", "--model", str(world_model), "--fractions", "10,100", "--items-per-task", "8",
           "--out", str(out))
    run = load_run(out)
    assert set(run.rows["fraction"].dropna()) == {10.0, 100.0}
    assert set(run.rows["metric"]) <= set(GLOSSARY) and {"fraction", "correlation"} <= set(run.rows["unit"])
    text = run.rows[run.rows["task"] == "heldout_text"]  # a world with held-out text adds its NLL to every probe
    assert set(run.rows["unit"]) - {"fraction", "correlation"} == set(text["unit"]) <= {"nats/token", "ratio"}
    assert (run.path / "figures" / "concentration.png").is_file()


def test_sensitivity_covers_every_group_and_side(world_model, tmp_path):
    out = tmp_path / "sensitivity"
    invoke("sensitivity", "--model", str(world_model), "--sites", "mlp.down@1", "--seeds", "1",
           "--items-per-task", "8", "--eps", "0.1,1", "--out", str(out))
    rows = load_run(out).rows
    perturbed = rows[rows["group"] >= 0]
    assert set(perturbed["side"]) == {"input", "output"}
    assert perturbed["group"].nunique() >= 5
    assert set(perturbed["eps"]) == {0.1, 1.0}
    assert perturbed.groupby("eps").size().nunique() == 1, "every strength covers the same groups, sides and tasks"
    assert (out / "figures" / "sensitivity_by_eps.png").is_file()


def test_bad_options_fail_before_any_work_with_one_paragraph(world_model, tmp_path):
    cases = [
        (["concentration", "--fractions", "0,50"], "fraction"),
        (["sensitivity", "--eps", "-1"], "eps"),
        (["drift", "--tau", "1.5"], "tau"),
        (["drift", "--editor", "rome2"], "Unknown editor"),
        (["spectrum", "--sites", "mlp.down@99"], "out of range"),
        (["spectrum", "--model", "no-such/model"], "not in the local"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, [*args, "--model", str(world_model)] if "--model" not in args else args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output


def _drift_args(world_model: Path, out: Path) -> list[str]:
    return ["drift", "--model", str(world_model), "--rounds", "3", "--batch-size", "3", "--eval-records", "6",
            "--items-per-task", "6", "--represent-prompts", "12", "--stats-corpus", str(world_model / "small_corpus.txt"),
            "--out", str(out)]


@pytest.fixture(scope="module")
def whole(world_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A drift run with the default options but small counts (3 rounds of 3 edits), uninterrupted."""
    out = tmp_path_factory.mktemp("drift") / "whole"
    result = invoke(*_drift_args(world_model, out))
    (out.parent / "console.txt").write_text(result.output)
    return out


@pytest.mark.slow
def test_the_readme_glossary_covers_every_metric_of_a_default_drift_run(whole):
    """Every metric name of a default drift run has a glossary entry with a unit, and the README shows the glossary."""
    import re

    from spectra.glossary import GLOSSARY, glossary_markdown

    rows = load_run(whole).rows
    assert set(rows["metric"]) <= set(GLOSSARY), set(rows["metric"]) - set(GLOSSARY)
    assert rows["unit"].notna().all() and set(rows["unit"]) <= {m.unit for m in GLOSSARY.values()}
    assert {"delta_spectral_rel", "spectral_norm_ratio", "functional_change"} <= set(rows["metric"])
    assert {"text_nll", "text_perplexity"} <= set(GLOSSARY), "a world with held-out text adds these (task heldout_text)"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Glossary of metrics"):]
    listed = re.findall(r"^\| `([^`]+)` \|", section[: section.index("\n## ", 3)], re.M)
    assert listed == list(GLOSSARY), "README's glossary must be spectra.glossary.glossary_markdown()"
    assert glossary_markdown() in readme


@pytest.mark.slow
def test_drift_resumed_after_an_interrupted_round_gives_the_same_rows(world_model, whole, tmp_path, monkeypatch):
    """Kill a drift run after round 2 of the first arm, resume it, compare with an uninterrupted run."""
    from spectra.editing import loop as loop_module

    interrupted = tmp_path / "interrupted"
    original_observe = loop_module.EditLoop.observe
    calls = {"n": 0}

    def crash_after_round_two(self, arm, round):
        if arm.name == "revive" and round == 2:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        return original_observe(self, arm, round)

    monkeypatch.setattr(loop_module.EditLoop, "observe", crash_after_round_two)
    result = runner.invoke(app, _drift_args(world_model, interrupted))
    assert result.exit_code != 0 and not interrupted.exists()
    assert Path(f"{interrupted}.partial").is_dir()
    monkeypatch.setattr(loop_module.EditLoop, "observe", original_observe)
    invoke(*_drift_args(world_model, interrupted), "--resume", str(interrupted))

    def comparable(path: Path) -> pd.DataFrame:
        rows = load_run(path).rows
        rows = rows[~rows["metric"].isin(["seconds_edit", "seconds_observe"])]
        return rows.sort_values([c for c in ("arm", "round", "site", "side", "task", "metric") if c in rows]).reset_index(drop=True)

    pd.testing.assert_frame_equal(comparable(whole), comparable(interrupted), check_exact=False, rtol=1e-5, atol=1e-6)
    run = load_run(interrupted)
    assert {"off", "revive"} == set(run.rows["arm"])
    assert any(key.startswith("ss/right/revive/") for key in run.tensors)
    figures = {p.name for p in (run.path / "figures").iterdir()}
    assert {"ls.png", "edit_metrics.png", "norm_growth.png"} <= figures
    residual = run.rows[(run.rows["metric"] == "protected_triplet_residual") & (run.rows["arm"] == "revive")]
    assert len(residual) and residual["value"].max() < 1e-4, "REVIVE must keep W0's protected singular triplets"
    unfiltered = run.rows[(run.rows["metric"] == "protected_triplet_residual") & (run.rows["arm"] == "off")]
    assert unfiltered["value"].max() > residual["value"].max()


@pytest.mark.slow
def test_drift_records_sigma_k_and_warns_when_the_update_passes_it(world_model, whole):
    """sigma_k_rel equals an independent SVD of the unedited weight; the console warns exactly when an update passed it."""
    import numpy as np
    from safetensors.numpy import load_file

    from spectra.experiments.drift import regime_note

    rows = load_run(whole).rows
    recorded = rows[rows["metric"] == "sigma_k_rel"]
    assert set(recorded["round"]) == {0} and len(recorded) == 2 * rows.loc[rows["metric"] == "LS", "site"].nunique()
    weights = {name: value for name, value in load_file(world_model / "model.safetensors").items()
               if name.endswith("mlp.down_proj.weight")}
    for site, value in recorded.groupby("site")["value"].first().items():
        layer = int(str(site).split("@")[1])
        S = np.linalg.svd(weights[f"model.layers.{layer}.mlp.down_proj.weight"].astype(np.float64), compute_uv=False)
        k = int(np.searchsorted(np.cumsum(S) / S.sum(), 0.1 - 1e-12)) + 1
        assert value == pytest.approx(S[k - 1] / S[0], rel=1e-5)
    last = rows[(rows["metric"] == "delta_spectral_rel") & (rows["round"] == rows["round"].max())]
    limits = last["site"].map(recorded.groupby("site")["value"].min())
    console = (whole.parent / "console.txt").read_text()
    assert ("protected resid max" in console) and ("|dW|2/s1 max" in console)
    if (last["value"] >= limits).any():
        assert "no longer compare the arms" in console and regime_note(rows) in console
    else:
        assert regime_note(rows) is None and "no longer compare the arms" not in console


def test_plot_redraws_a_run_without_the_model(world_model, tmp_path):
    out = tmp_path / "spectrum-for-plot"
    invoke("spectrum", "--model", str(world_model), "--sites", "mlp.down", "--out", str(out))
    for png in (out / "figures").glob("*"):
        png.unlink()
    result = invoke("plot", str(out))
    assert ".png" in result.output
