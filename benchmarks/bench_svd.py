"""Spectral pass: spectra's ``svd_many`` of every FFN matrix of a model against the usual alternatives.

Methods, all on the same (out, in) float32 matrices and timed in one run, one repetition after
the other (a repetition runs every method once, in a rotating order):

- ``spectra``: ``spectra.spectral.svd_many`` (thin U, S, Vh; on --device).
- ``spectra_cached``: the same spectra through ``SpectrumCache.get_or_compute_many`` with the cache
  already filled (untimed): what a repeated analysis of unchanged weights costs (hashing the
  weights and reading U, S, Vh back from disk).
- ``scipy``: ``scipy.linalg.svd`` (LAPACK gesdd in float32, thin U, S, Vh) one matrix at a time.
  (``numpy.linalg.svd`` is left out: it computes float32 input in float64, about twice scipy's time.)
- ``torch``: ``torch.linalg.svd`` (thin) one matrix at a time, as the matrix comes (on --device).
- ``torch_svdvals``: ``torch.linalg.svdvals`` one matrix at a time: singular values only, no vectors
  (what a values-only path in spectra would cost; weightwatcher computes values only too).
- ``weightwatcher``: ``WeightWatcher.analyze`` restricted to the same layers with its defaults
  (singular values in float64 via SciPy, then its power-law fits): what a user of that package
  runs to analyse a model. Its singular values (``get_ESD``, sigma^2) are read once for the check.

weightwatcher computes singular values only, no vectors; spectra's pass computes U, S and Vh
because every consumer (REVIVE, SS, groups) needs them. Singular values are checked against a
float64 LAPACK reference: max_i |s_i - s_ref_i| / s_ref_1 per matrix (a normwise relative error,
the accuracy an fp32 SVD promises), worst matrix reported, on the first repetition's output.
Every library is initialised on a small matrix first. Ratios are method / spectra per repetition.

Models: ``tiny`` (the embedded model, ``spectra.load_model("tiny")``) and ``gpt2-small``, a
random-init GPT-2 of GPT-2 small's shape built from a transformers config (no weights can be
downloaded here; timing and agreement do not depend on trained values).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from common import add_common_arguments, environment, paired_ratios, resolve_device, summary, sync, write_result
from spectra.models import Adapter, Site, adapter_for
from spectra.spectral import SpectrumCache, svd_many

FFN_KINDS = ("mlp.gate", "mlp.up", "mlp.down")
MODELS = ("tiny", "gpt2-small")

Matrices = dict[Site, torch.Tensor]
Method = Callable[[], dict[Site, np.ndarray]]


def build_model(name: str, gpt2_hidden: int, gpt2_layers: int, seed: int) -> torch.nn.Module:
    """The embedded tiny model, or a seeded random-init GPT-2 of the given width and depth."""
    if name == "tiny":
        from spectra.models import load_model

        return load_model("tiny", device="cpu").model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)  # transformers initialises from the global generator
    config = GPT2Config(n_embd=gpt2_hidden, n_layer=gpt2_layers, n_head=max(1, gpt2_hidden // 64))
    return GPT2LMHeadModel(config).eval()


def ffn_matrices(adapter: Adapter) -> Matrices:
    """Every FFN matrix as a contiguous float32 (out, in) tensor on the CPU."""
    return {site: adapter.read(site).float().contiguous() for site in adapter.sites(kinds=FFN_KINDS)}


def weightwatcher_layer_ids(model: torch.nn.Module, adapter: Adapter, sites: list[Site], watcher: object) -> dict[Site, int]:
    """weightwatcher's layer id of each site, matched by module name (not by guessing from names)."""
    name_of = {id(module): name for name, module in model.named_modules()}
    described = watcher.describe()
    id_of = dict(zip(described["longname"], described["layer_id"]))
    return {site: int(id_of[name_of[id(adapter.module(site))]]) for site in sites}


def make_methods(
    model: torch.nn.Module, adapter: Adapter, mats: Matrices, device: torch.device, cache_root: Path
) -> tuple[dict[str, Method], Method | None]:
    """The timed methods, each returning the singular values of every matrix (float64 numpy, descending; empty
    when the method gives none back), and weightwatcher's singular values for the check (None if not installed)."""
    arrays = {site: W.numpy() for site, W in mats.items()}
    on_device = {site: W.to(device) for site, W in mats.items()}

    def spectra_pass() -> dict[Site, np.ndarray]:
        spectra = svd_many(on_device, device=device)
        sync(device)
        return {site: s.S.double().cpu().numpy() for site, s in spectra.items()}

    cache = SpectrumCache(cache_root)
    key_fields = {site: {"site": str(site)} for site in mats}
    cache.get_or_compute_many(key_fields, on_device, device=device)  # fill the cache, untimed

    def spectra_cached_pass() -> dict[Site, np.ndarray]:
        spectra = cache.get_or_compute_many(key_fields, on_device, device=device)
        sync(device)
        return {site: s.S.double().cpu().numpy() for site, s in spectra.items()}

    def scipy_pass() -> dict[Site, np.ndarray]:
        return {site: scipy.linalg.svd(W, full_matrices=False)[1].astype(np.float64) for site, W in arrays.items()}

    def torch_pass() -> dict[Site, np.ndarray]:
        out = {site: torch.linalg.svd(W, full_matrices=False)[1] for site, W in on_device.items()}
        sync(device)
        return {site: S.double().cpu().numpy() for site, S in out.items()}

    def torch_values_pass() -> dict[Site, np.ndarray]:
        out = {site: torch.linalg.svdvals(W) for site, W in on_device.items()}
        sync(device)
        return {site: S.double().cpu().numpy() for site, S in out.items()}

    methods: dict[str, Method] = {
        "spectra": spectra_pass, "spectra_cached": spectra_cached_pass, "scipy": scipy_pass, "torch": torch_pass, "torch_svdvals": torch_values_pass,
    }
    try:
        import weightwatcher
    except ImportError:
        return methods, None
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = weightwatcher.WeightWatcher(model=model)
    ids = weightwatcher_layer_ids(model, adapter, list(mats), watcher)
    watcher.analyze(layers=[min(ids.values())], plot=False)  # first-call set-up, not timed

    def ww_analyze() -> dict[Site, np.ndarray]:
        details = watcher.analyze(layers=list(ids.values()), plot=False)
        if len(details) != len(ids):
            raise RuntimeError(f"weightwatcher analysed {len(details)} layers, expected {len(ids)}")
        return {}

    def ww_values() -> dict[Site, np.ndarray]:
        return {site: np.sqrt(np.sort(np.asarray(watcher.get_ESD(layer=i), dtype=np.float64))[::-1]) for site, i in ids.items()}

    methods["weightwatcher"] = ww_analyze
    return methods, ww_values


def warm_up(device: torch.device) -> None:
    """Initialise LAPACK, cuSOLVER and the thread pools on a small matrix, so no measurement pays for it."""
    W = torch.randn(64, 256)
    svd_many({"w": W.to(device)}, device=device)
    torch.linalg.svd(W.to(device), full_matrices=False)
    scipy.linalg.svd(W.numpy(), full_matrices=False)
    sync(device)


def worst_error(values: dict[Site, np.ndarray], reference: dict[Site, np.ndarray]) -> float:
    """max over matrices of max_i |s_i - s_ref_i| / s_ref_1."""
    worst = 0.0
    for site, ref in reference.items():
        s = np.sort(values[site])[::-1][: ref.size]
        worst = max(worst, float(np.max(np.abs(s - ref)) / ref[0]))
    return worst


def bench_model(name: str, reps: int, device: torch.device, gpt2_hidden: int, gpt2_layers: int, seed: int) -> dict:
    """Time every method on every FFN matrix of one model, ``reps`` repetitions; check singular values."""
    model = build_model(name, gpt2_hidden, gpt2_layers, seed)
    adapter = adapter_for(model)
    mats = ffn_matrices(adapter)
    with tempfile.TemporaryDirectory(prefix="spectra-bench-cache-") as cache_root:
        return _bench_model(name, model, adapter, mats, device, Path(cache_root), reps)


def _bench_model(
    name: str, model: torch.nn.Module, adapter: Adapter, mats: Matrices, device: torch.device, cache_root: Path, reps: int
) -> dict:
    """``bench_model``'s measurements, with ``cache_root`` as the spectrum cache of ``spectra_cached``."""
    methods, ww_values = make_methods(model, adapter, mats, device, cache_root)
    reference = {site: np.linalg.svd(W.double().numpy(), compute_uv=False) for site, W in mats.items()}

    errors: dict[str, float] = {}
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    order = list(methods)
    for rep in range(reps):
        for method in order[rep % len(order):] + order[: rep % len(order)]:
            start = time.perf_counter()
            values = methods[method]()
            seconds[method].append(time.perf_counter() - start)
            if rep == 0 and values:
                errors[method] = worst_error(values, reference)
    if ww_values is not None:
        errors["weightwatcher"] = worst_error(ww_values(), reference)

    shapes = sorted({tuple(W.shape) for W in mats.values()})
    return {
        "model": name,
        "matrices": len(mats),
        "shapes": [list(s) for s in shapes],
        "seconds": {method: summary(values) for method, values in seconds.items()},
        "ratio_over_spectra": {
            method: paired_ratios(values, seconds["spectra"]) for method, values in seconds.items() if method != "spectra"
        },
        "weightwatcher_over_spectra_cached": (
            paired_ratios(seconds["weightwatcher"], seconds["spectra_cached"]) if "weightwatcher" in seconds else None
        ),
        "max_rel_error_vs_float64": errors,
        "weightwatcher": ww_values is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="Models to decompose.")
    parser.add_argument("--reps", type=int, default=3, help="Timed repetitions per method (default 3).")
    parser.add_argument("--gpt2-hidden", type=int, default=768, help="Width of the random GPT-2 (768: GPT-2 small).")
    parser.add_argument("--gpt2-layers", type=int, default=12, help="Depth of the random GPT-2 (12: GPT-2 small).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random GPT-2's initialisation.")
    add_common_arguments(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    warm_up(device)

    results = []
    for name in args.models:
        print(f"SVD pass {name} ...", flush=True)
        row = bench_model(name, args.reps, device, args.gpt2_hidden, args.gpt2_layers, args.seed)
        if not row["weightwatcher"]:
            print("  weightwatcher is not installed: pip install weightwatcher to compare against it", flush=True)
        timing = "  ".join(f"{m} {s['median']:.3g} s" for m, s in row["seconds"].items())
        ratios = "  ".join(f"{m}/spectra {r['median']:.2f}x" for m, r in row["ratio_over_spectra"].items())
        print(f"  {row['matrices']} matrices {row['shapes']}\n  {timing}\n  {ratios}\n  errors {row['max_rel_error_vs_float64']}", flush=True)
        results.append(row)
    payload = {
        "benchmark": "svd",
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    print(f"wrote {write_result('svd', payload, args.out)}")


if __name__ == "__main__":
    main()
