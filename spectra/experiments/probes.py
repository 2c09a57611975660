"""Where general ability lives in the spectrum: ``spectrum``, ``concentration`` and ``sensitivity`` (paper Sec. 2.2),
and where facts live along the layers: ``trace`` (causal tracing, which picks an editor's layers).

Each probe changes the chosen sites, measures general ability, and restores the original weights
bit for bit before the next change (checked, not assumed).
"""

from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from spectra.data.datasets import resolve_dataset
from spectra.errors import SpectraError
from spectra.evaluation.general import GeneralAbility, HeldoutText
from spectra.evaluation.tracing import CausalTrace, causal_trace
from spectra.experiments.common import (
    CommonOptions, GeneralOptions, check_fraction_list, choose_sites, default_dataset, general_ability, general_rows,
    heldout_text, open_model, usable_records,
)
from spectra.models.loading import LoadedModel, check_device_map, check_model_source, load_tokenizer, resolve_dtype
from spectra.models.sites import Site
from spectra.glossary import with_units
from spectra.progress import progress_iter
from spectra.results import RunWriter, check_run_target, create_run
from spectra.spectral import Spectrum, SpectrumCache, group_perturbation, spectrum_table

DEFAULT_FRACTIONS = [5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
FFN_KINDS = ("mlp.up", "mlp.gate", "mlp.down")


@dataclass
class SpectrumConfig(CommonOptions):
    """Options of ``spectra spectrum``."""

    sites: str | None = None
    taus: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])
    svd_dtype: str = "float32"

    def validate(self) -> None:
        for tau in self.taus:
            if not 0.0 < tau < 1.0:
                raise SpectraError(f"Every tau must lie in (0, 1); got {tau}.")
        if self.svd_dtype not in ("float32", "float64"):
            raise SpectraError(f"--svd-dtype must be float32 or float64, not {self.svd_dtype!r}.")


@dataclass
class ConcentrationConfig(CommonOptions):
    """Options of ``spectra concentration`` (paper Fig. 2a)."""

    sites: str | None = None
    fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    #: rebuild one site kind at a time (mlp.up, ..., attn.o; rows carry a kind column) instead of every chosen site at once
    by_kind: bool = False
    general: GeneralOptions = field(default_factory=GeneralOptions)

    def validate(self) -> None:
        check_fraction_list(self.fractions, "Every fraction (percent of singular-value energy kept)", 0.0, 100.0)


@dataclass
class SensitivityConfig(CommonOptions):
    """Options of ``spectra sensitivity`` (paper Fig. 2b and 11)."""

    sites: str | None = None
    side: str = "both"
    #: perturbation strengths, each relative to ||W||_F unless eps_absolute; several draw the curve over eps.
    #: 1.0 by default: on the tiny model every group leaves every task at 1.00 at eps 0.1 (and 0.3 costs
    #: at most 0.4 %), while at 1.0 the top input group costs 20 % of the mean accuracy and doubles the
    #: held-out NLL (0.91 -> 2.41) and the bottom group costs nothing (curve over 0.1-3 in the README)
    eps: list[float] = field(default_factory=lambda: [1.0])
    eps_absolute: bool = False
    seeds: int = 3
    groups: int = 10
    #: perturb one site kind at a time (rows carry a kind column) instead of every chosen site at once
    by_kind: bool = False
    general: GeneralOptions = field(default_factory=GeneralOptions)

    def validate(self) -> None:
        if self.side not in ("input", "output", "both"):
            raise SpectraError(f"--side must be input, output or both, not {self.side!r}.")
        if not self.eps or not all(0.0 <= eps < float("inf") for eps in self.eps):
            raise SpectraError(f"--eps must be one or more finite numbers >= 0 (comma-separated); got {self.eps}.")
        if self.seeds < 1 or self.groups < 2:
            raise SpectraError(f"--seeds must be >= 1 and the number of groups >= 2 (got {self.seeds}, {self.groups}).")

    def sides(self) -> list[str]:
        return ["input", "output"] if self.side == "both" else [self.side]


def decompose_sites(model: LoadedModel, sites: list[Site], dtype: torch.dtype = torch.float32,
                    progress: bool = True) -> tuple[dict[Site, torch.Tensor], dict[Site, Spectrum]]:
    """Original weights (model dtype) and their spectra, batched and cached on disk by weight fingerprint."""
    originals = {site: model.adapter.read(site) for site in sites}
    cache = SpectrumCache()
    spectra = cache.get_or_compute_many(
        {site: {"model": model.source, "revision": model.revision, "site": str(site)} for site in sites},
        {site: W.float() for site, W in originals.items()},
        dtype=dtype, device=model.device, progress=progress,
    )
    return originals, spectra


@contextmanager
def restored(model: LoadedModel, originals: dict[Site, torch.Tensor]) -> Iterator[None]:
    """Run the body, then write the original weights back and check they are bit-identical."""
    try:
        yield
    finally:
        for site, weight in originals.items():
            model.adapter.write(site, weight)
        for site, weight in originals.items():
            if not torch.equal(model.adapter.read(site), weight):
                raise SpectraError(f"Restoring {site} did not give back the original weights bit for bit.")


def run_spectrum(config: SpectrumConfig, progress: bool = True) -> tuple[Path, list[dict]]:
    """Per site: shape, k and k/rank per tau, spectral norm, condition number, effective rank."""
    config.validate()
    check_inputs(config)
    model = open_model(config)
    sites = choose_sites(model, config.sites, FFN_KINDS + ("attn.q", "attn.k", "attn.v", "attn.o"))
    _, spectra = decompose_sites(model, sites, torch.float64 if config.svd_dtype == "float64" else torch.float32, progress)
    rows = []
    for site in sites:
        table = spectrum_table(spectra[site], config.taus)
        base = {"experiment": "spectrum", "site": str(site), "kind": site.kind, "layer": site.layer}
        for name, value in table.items():
            tau = None
            for candidate in config.taus:
                suffix = f"@{candidate:g}"
                if name.endswith(suffix):
                    name, tau = name.removesuffix(suffix), candidate
            rows.append({**base, "tau": tau, "metric": "k_over_rank" if name == "k_frac" else name, "value": value})
    return _write(create_run("spectrum", config, out=config.out), rows), rows


@dataclass
class _Probe:
    """What both probes set up: the model, its sites with originals and spectra, the ability probes, the run."""

    model: LoadedModel
    sites: list[Site]
    originals: dict[Site, torch.Tensor]
    spectra: dict[Site, Spectrum]
    ability: GeneralAbility
    text: HeldoutText | None
    writer: RunWriter

    @classmethod
    def open(cls, command: str, config: ConcentrationConfig | SensitivityConfig, progress: bool) -> "_Probe":
        """Validate and check the inputs, then load, decompose and start the run."""
        config.validate()
        check_inputs(config)
        ability = general_ability(config.model, config.general, config.seed)
        text = heldout_text(config.model, config.general)
        model = open_model(config)
        sites = choose_sites(model, config.sites, FFN_KINDS)
        originals, spectra = decompose_sites(model, sites, progress=progress)
        return cls(model, sites, originals, spectra, ability, text, create_run(command, config, out=config.out))

    def groups(self, by_kind: bool) -> list[tuple[str | None, list[Site]]]:
        """The sets of sites changed together: every chosen site at once (kind None), or one kind at a time."""
        if not by_kind:
            return [(None, self.sites)]
        kinds = dict.fromkeys(site.kind for site in self.sites)
        return [(kind, [site for site in self.sites if site.kind == kind]) for kind in kinds]

    def record(self, **context: object) -> None:
        """Measure general ability (and held-out text NLL) now and add the rows with ``context``."""
        self.writer.add_rows(general_rows(self.ability, self.text, self.model, **context))


def run_concentration(config: ConcentrationConfig, progress: bool = True, figures: bool = True) -> Path:
    """Replace every chosen site (or each kind's) by its top-n %-energy reconstruction, for each n; measure general ability.

    ``figures=False`` leaves the run's figures undrawn (a batch of runs that draws its own).
    """
    probe = _Probe.open("concentration", config, progress)
    model, spectra, writer = probe.model, probe.spectra, probe.writer
    jobs = [(kind, sites, fraction) for kind, sites in probe.groups(config.by_kind) for fraction in sorted(config.fractions)]
    with writer.running():
        probe.record(experiment="concentration", fraction=None, baseline=True)
        for kind, sites, fraction in progress_iter(jobs, "concentration", enabled=None if progress else False):
            with restored(model, probe.originals):
                for site in sites:
                    model.adapter.write(site, spectra[site].reconstruct_top_energy(fraction / 100.0))
                probe.record(experiment="concentration", fraction=fraction, baseline=False, kind=kind)
        return _plotted(writer.finalize(), figures)


def run_sensitivity(config: SensitivityConfig, progress: bool = True, figures: bool = True) -> Path:
    """Perturb one energy group of every chosen site (or each kind's) at a time, input or output side, over seeds.

    ``figures=False`` leaves the run's figures undrawn.
    """
    probe = _Probe.open("sensitivity", config, progress)
    model, originals, spectra, writer = probe.model, probe.originals, probe.spectra, probe.writer
    groups = {site: spectra[site].groups(config.groups) for site in probe.sites}
    jobs = [(kind, sites, strength, side, group, seed) for kind, sites in probe.groups(config.by_kind)
            for strength in config.eps for side in config.sides() for group in range(config.groups)
            for seed in range(config.seeds)]
    with writer.running():
        probe.record(experiment="sensitivity", side=None, group=-1, seed=None, baseline=True)
        for kind, sites, strength, side, group, seed in progress_iter(jobs, "sensitivity", enabled=None if progress else False):
            generator = torch.Generator(device=spectra[sites[0]].U.device).manual_seed(config.seed * 10_007 + seed)
            touched = [site for site in sites if groups[site][group].numel()]
            if not touched:
                continue
            with restored(model, originals):
                for site in touched:
                    norm = strength if config.eps_absolute else strength * spectra[site].fro_norm
                    delta = group_perturbation(spectra[site], groups[site][group], side, norm, generator)
                    model.adapter.write(site, originals[site].float() + delta.to(originals[site].device))
                probe.record(experiment="sensitivity", side=side, group=group, seed=seed, eps=strength,
                             baseline=False, kind=kind)
        return _plotted(writer.finalize(), figures)


@dataclass
class TraceConfig(CommonOptions):
    """Options of ``spectra trace``."""

    dataset: str = "auto"
    facts: int = 30
    noise: float = 3.0
    skip_bad_records: bool = False

    def validate(self) -> None:
        if self.facts < 1:
            raise SpectraError(f"--facts must be at least 1; got {self.facts}.")
        if self.noise <= 0:
            raise SpectraError(f"--noise must be positive (a multiple of the embeddings' std); got {self.noise}.")


def run_trace(config: TraceConfig) -> Path:
    """Causal trace of a seeded sample of facts the model knows: P(true object) with one state restored."""
    config.validate()
    check_inputs(config)
    dataset = default_dataset(config.model) if config.dataset == "auto" else config.dataset
    _, records = resolve_dataset(dataset, model_name=config.model)
    tokenizer = load_tokenizer(config.model, config.allow_download)
    if config.skip_bad_records:
        records, skipped = usable_records(records, tokenizer, dataset, skip=True)
        if skipped:
            print(f"Skipped {len(skipped)} records the model cannot represent (--skip-bad-records).", file=sys.stderr)
    if config.facts > len(records):
        raise SpectraError(f"--facts {config.facts} asks for more facts than {dataset} has ({len(records)} usable "
                           f"records). Trace at most {len(records)}.")
    chosen = random.Random(config.seed).sample(records, config.facts)
    usable_records(chosen, tokenizer, dataset, skip=False)
    model = open_model(config, tokenizer)
    trace = causal_trace(model, chosen, noise_scale=config.noise, seed=config.seed)
    rows = [{"experiment": "trace", **row} for row in trace_rows(trace)]
    return _write(create_run("trace", config, out=config.out), rows)


def trace_rows(trace: CausalTrace) -> list[dict]:
    """A trace's probabilities, and per block and position the share of the clean-corrupted gap it recovers
    (none when the corrupted run kept the fact)."""
    rows = [{"metric": "trace_probability", "position": r["position"], "layer": r["layer"], "value": r["probability"]}
            for r in trace.rows()]
    gap = trace.clean - trace.corrupted
    if gap > 0:
        rows += [{"metric": "trace_recovery", "position": position, "layer": layer, "value": (p - trace.corrupted) / gap}
                 for position, values in trace.restored.items() for layer, p in enumerate(values)]
    return rows


def check_inputs(config: CommonOptions) -> None:
    """What every probe checks before its model loads: the model's files, its placement and the run directory."""
    check_model_source(config.model)
    check_device_map(config.device_map)
    resolve_dtype(config.dtype)
    check_run_target(config.out)


def _write(writer: RunWriter, rows: list[dict]) -> Path:
    """Write a probe's rows as a finished run and draw its figures; returns the run's path."""
    with writer.running():
        writer.add_rows(with_units(rows))
        path = writer.finalize()
    return _plotted(path)


def _plotted(path: Path, figures: bool = True) -> Path:
    """``path`` after drawing its figures (unless ``figures`` is False)."""
    from spectra.plots import plot_run

    if figures:
        plot_run(path)
    return path


