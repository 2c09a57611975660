"""Output for humans and programs: whole tables in files and pipes, CSV/JSON to stdout, progress only on terminals."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_editing_support import requests, tiny_model
from test_editing_support import single_thread  # noqa: F401 - autouse fixture, applied to this module
from typer.testing import CliRunner

from spectra.editing.core import ZSettings, optimize_targets
from spectra.progress import ConsoleStages
from spectra_cli.main import app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama saved in a plain directory with its word-level tokenizer."""
    directory = tmp_path_factory.mktemp("model")
    model = tiny_model("llama")
    model.model.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return directory


def test_a_table_written_to_a_file_or_pipe_is_never_cut(model_dir, tmp_path) -> None:
    """The CLI runner's stdout is not a terminal: every site and number is there in full, in any format."""
    runner = CliRunner()
    args = ["spectrum", "--model", str(model_dir), "--device", "cpu"]
    text = runner.invoke(app, [*args, "--out", str(tmp_path / "text")])
    assert text.exit_code == 0, text.output
    sites = [f"{kind}@{layer}" for kind in ("mlp.up", "mlp.gate", "mlp.down", "attn.q", "attn.o") for layer in range(4)]
    assert all(site in text.stdout for site in sites) and "…" not in text.stdout
    assert "64x32" in text.stdout and max(map(len, text.stdout.splitlines())) > 80, "a wide table stays one line per row"
    as_csv = runner.invoke(app, [*args, "--format", "csv", "--out", str(tmp_path / "csv")])
    table = pd.read_csv(io.StringIO(as_csv.stdout))
    assert len(table) == 28 and {"site", "shape", "k @0.1", "k/rank % @0.1", "sigma_1"} <= set(table.columns)
    assert "run directory:" in as_csv.stderr and "run directory:" not in as_csv.stdout
    as_json = json.loads(runner.invoke(app, [*args, "--format", "json", "--out", str(tmp_path / "json")]).stdout)
    assert {row["site"] for row in as_json} == set(table["site"])
    bad = runner.invoke(app, ["models", "--format", "xml"])
    assert bad.exit_code == 2 and "--format must be one of table, csv, json" in bad.output


def test_spectra_models_redirected_to_a_file_keeps_every_column(tmp_path) -> None:
    """A real process whose stdout is a file (no terminal, no COLUMNS): rich would cut this table to 80 columns."""
    target = tmp_path / "models.txt"
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    with open(target, "w") as handle:
        subprocess.run([sys.executable, "-c", "from spectra_cli.main import main; main()", "models"], stdout=handle,
                       check=True, env=env, timeout=120)
    text = target.read_text()
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in text and "spectra:assets/tiny" in text and "…" not in text
    assert "editor defaults" in text and "--hparams FILE" in text


def test_progress_bars_report_every_z_step_and_hide_without_a_terminal() -> None:
    assert ConsoleStages().enabled is False, "pytest's stderr is not a terminal"
    model = tiny_model("llama")
    steps: list[int] = []
    settings = ZSettings(layer=2, key_position="last", steps=4, lr=0.5, weight_decay=1e-3, clamp_norm_factor=4.0,
                         kl_factor=0.0625, early_stop_loss=0.0, batch_size=64)
    optimize_targets(model, requests(model, 2), ["{}"], settings, on_step=steps.append)
    assert steps == [1, 1, 1, 1]


def test_a_probe_bar_goes_to_a_terminal_stderr_only_and_never_to_stdout(capsys, monkeypatch) -> None:
    """Without a terminal the items pass through silently; with a bar forced on, stdout still gets nothing."""
    from spectra.progress import progress_iter

    assert list(progress_iter(range(3), "jobs")) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")
    assert list(progress_iter(range(3), "jobs", enabled=True)) == [0, 1, 2]
    assert capsys.readouterr().out == ""


def test_concentration_csv_on_stdout_parses_without_a_progress_bar(world_model, tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["concentration", "--model", str(world_model), "--device", "cpu", "--fractions", "50,100",
                                 "--items-per-task", "4", "--format", "csv", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "━" not in result.stdout
    assert len(pd.read_csv(io.StringIO(result.stdout))) >= 2
