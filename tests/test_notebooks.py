"""The analysis notebooks: committed without outputs, and executed top to bottom on a fresh kernel."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

from spectra.experiments.common import GeneralOptions
from spectra.experiments.probes import ConcentrationConfig, run_concentration

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 300
KERNEL = "python3"

#: Per notebook, values injected after its ``parameters`` cell (papermill style) so its own run takes seconds.
SMALL = {
    "ss_heatmaps.ipynb": {"ROUNDS": 2, "BATCH_SIZE": 3, "EVAL_RECORDS": 6, "ITEMS_PER_TASK": 6},
    "concentration_sensitivity.ipynb": {"SITES": "mlp.down@1", "ITEMS_PER_TASK": 6},
    "tau_sweep.ipynb": {"ROUNDS": 1, "BATCH_SIZE": 3, "EVAL_RECORDS": 6, "ITEMS_PER_TASK": 6},
}

#: Environment variables the notebooks read; cleared so that a user's settings never leak into a test.
NOTEBOOK_VARIABLES = ("SPECTRA_RUN", "SPECTRA_SWEEP_RUN", "SPECTRA_CONCENTRATION_RUN", "SPECTRA_SENSITIVITY_RUN",
                      "SPECTRA_MODEL", "SPECTRA_STATS_CORPUS")


@pytest.fixture
def notebook_env(world_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Kernel environment: the test model, caches and temporary run directories under ``tmp_path``; returns it."""
    for name in NOTEBOOK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPECTRA_MODEL", str(world_model))
    monkeypatch.setenv("SPECTRA_STATS_CORPUS", str(world_model / "small_corpus.txt"))
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the notebooks' own runs go (tempfile.mkdtemp)
    # The test model's 32-wide matrices gain nothing from threads, and on a shared CPU extra threads only contend.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if not _kernel_runs_this_python(KERNEL):
        spec = tmp_path / "jupyter" / "kernels" / KERNEL
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        kernel = {"argv": argv, "display_name": "spectra tests", "language": "python"}
        (spec / "kernel.json").write_text(json.dumps(kernel))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return tmp_path


def _kernel_runs_this_python(name: str) -> bool:
    """Whether kernel ``name`` would start this interpreter (and so import this checkout's spectra)."""
    try:
        argv = KernelSpecManager().get_kernel_spec(name).argv
    except NoSuchKernel:
        return False
    # jupyter_client itself launches a bare "python", "python3" or "python3.X" as sys.executable.
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    return bool(argv) and argv[0] in bare | {sys.executable}


def execute(name: str, workdir: Path, checks: str = "") -> nbformat.NotebookNode:
    """Run notebook ``name`` with its SMALL parameters injected and ``checks`` appended as a last cell."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    for key in SMALL[name]:
        assert re.search(rf"^{key} = ", nb.cells[index].source, re.M), f"{name} has no parameter {key}"
    injected = "\n".join(f"{key} = {value!r}" for key, value in SMALL[name].items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    if checks:
        nb.cells.append(nbformat.v4.new_code_cell(checks))
    NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def figures(nb: nbformat.NotebookNode) -> int:
    """How many images the executed notebook shows."""
    return sum("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))


def test_every_notebook_is_committed_without_outputs_and_tested():
    assert {path.name for path in NOTEBOOKS.glob("*.ipynb")} == set(SMALL)
    for name in SMALL:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: the first code cell must be the parameters"
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{name} has stored outputs"


@pytest.mark.slow
def test_ss_heatmaps_is_the_three_line_recipe_and_draws_both_arms(notebook_env):
    nb = execute("ss_heatmaps.ipynb", notebook_env, checks="""
assert run.ss_rounds("off") == run.ss_rounds("revive") == [0, 1, 2], run.ss_rounds("off")
residual = run.rows[run.rows["metric"] == "protected_triplet_residual"].groupby("arm")["value"].max()
assert residual["revive"] < 1e-4 < residual["off"], residual
""")
    recipe = next(cell.source for cell in nb.cells if "spectra.load_run" in cell.source)
    assert recipe.splitlines() == ["import spectra", "run = spectra.load_run(RUN)",
                                   'spectra.plots.ss_heatmap(run, arm="off")']
    assert figures(nb) == 2  # the off arm, then REVIVE, for the same site and rounds


@pytest.mark.slow
def test_concentration_sensitivity_reads_a_given_run_and_makes_the_missing_one(notebook_env, world_model, monkeypatch):
    given = run_concentration(ConcentrationConfig(model=str(world_model), sites="mlp.down@1", fractions=[10.0, 100.0],
                                                  general=GeneralOptions(items_per_task=6), out=notebook_env / "given"),
                              progress=False)
    monkeypatch.setenv("SPECTRA_CONCENTRATION_RUN", str(given))
    nb = execute("concentration_sensitivity.ipynb", notebook_env, checks=f"""
assert concentration.path == Path({str(given)!r})
assert sensitivity.path.parent.parent == Path({str(notebook_env)!r}) and sensitivity.command == "sensitivity"
""")
    assert figures(nb) == 2


@pytest.mark.slow
def test_tau_sweep_has_the_off_arm_and_one_arm_per_tau(notebook_env):
    nb = execute("tau_sweep.ipynb", notebook_env, checks="""
assert list(table.index) == ["off", "revive@0.05", "revive@0.1", "revive@0.2", "revive@0.3"], list(table.index)
assert {"efficacy", "paraphrase", "neighborhood", "general_accuracy"} <= set(table.columns)
assert table.notna().all().all()
""")
    assert figures(nb) == 1
