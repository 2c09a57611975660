"""Regenerate the README's reference figures of the embedded model: ``python -m spectra.experiments.reference_figures DIR``.

Runs the experiments with their defaults on the embedded tiny model (each into its own run
directory under ``DIR/runs``) and copies the figures the README shows to ``DIR/<name>.png``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from spectra.experiments.drift import DriftConfig, run_drift
from spectra.experiments.probes import ConcentrationConfig, SensitivityConfig, SpectrumConfig, run_concentration
from spectra.experiments.probes import TraceConfig, run_sensitivity, run_spectrum, run_trace

#: README figure name -> (experiment, figure file inside the run's figures/)
SHOWN = {
    "energy_spectrum": ("spectrum", "energy_spectrum.png"),
    "concentration": ("concentration", "concentration.png"),
    "sensitivity": ("sensitivity", "sensitivity.png"),
    "sensitivity_by_eps": ("sensitivity", "sensitivity_by_eps.png"),
    "drift_edit_metrics": ("drift", "edit_metrics.png"),
    "drift_ls": ("drift", "ls.png"),
    "drift_norms": ("drift", "norm_growth.png"),
    "drift_overview": ("drift", "drift_overview.png"),
    "drift_tsne": ("drift", "tsne.png"),
    "tau_sweep": ("sweep", "tau_sweep.png"),
    "causal_trace": ("trace", "causal_trace.png"),
}


def regenerate(target: Path) -> dict[str, Path]:
    """Run every experiment and copy the shown figures into ``target``; returns the run directories."""
    runs = target / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    made = {
        "spectrum": run_spectrum(SpectrumConfig(out=runs / "spectrum", sites="mlp.up,mlp.gate,mlp.down"))[0],
        "concentration": run_concentration(ConcentrationConfig(out=runs / "concentration")),
        "sensitivity": run_sensitivity(SensitivityConfig(out=runs / "sensitivity", eps=[0.1, 0.3, 1.0, 3.0])),
        "trace": run_trace(TraceConfig(out=runs / "trace")),
        "drift": run_drift(DriftConfig(out=runs / "drift", tsne=True)),
        "sweep": run_drift(DriftConfig(out=runs / "sweep", rounds=5, batch_size=50, tau=[0.05, 0.1, 0.2, 0.3],
                                       represent_prompts=0)),
    }
    for name, (experiment, figure) in SHOWN.items():
        source = made[experiment] / "figures" / figure
        if source.is_file():
            shutil.copyfile(source, target / f"{name}.png")
    return made


if __name__ == "__main__":
    regenerate(Path(sys.argv[1] if len(sys.argv) > 1 else "figures"))
