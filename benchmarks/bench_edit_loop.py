"""Edit loop: seconds per MEMIT round and peak memory, REVIVE off and on, and where a round's time goes.

Runs ``spectra drift`` (``spectra.experiments.drift.run_drift``) on the embedded tiny model, one
arm per process so that each arm's peak resident memory is its own (``ru_maxrss``). The arms
alternate (off, on, on, off, ...) over ``--repeats`` pairs, over the same requests in the same order.

Time per round comes from the ``seconds_edit`` and ``seconds_observe`` rows the loop writes. The
editor's phases are timed from outside by wrapping, in the child process only, the functions a
MEMIT round calls (nothing in the library is edited):

- ``key_rows``: tokenising the requests into the key rows;
- ``z_optimisation``: ``optimize_targets``, the Adam search for the target hidden states z;
- ``keys_forward``: ``keys_and_hidden``, the forward passes reading keys and hidden states per layer;
- ``solve``: the editor's per-layer closed-form solve (covariance lookup included);
- ``filter``: the site filter's calls (REVIVE's projection, or the identity) and ``begin_round``;
- ``other``: the rest of ``seconds_edit`` (adding the update to the weight, writing it, logging).

Once per model, before any arm: ``key_statistics`` (C = E[k k^T] over the tiny world's corpus) and
``templates`` (context templates), timed in the parent while it makes sure the statistics cache
holds them; every arm then reads the cache, so no arm pays (or is spared) the one-off cost. The
cache is spectra's own (``$SPECTRA_CACHE`` or ``~/.cache/spectra``), so the one-off cost is paid
once across benchmark runs and ``spectra drift`` runs; ``--cache DIR`` with a fresh directory
measures it again (the result records whether it was a cache miss).
Figures are not drawn (``plot_run`` is replaced by a no-op): they are no part of the loop.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import add_common_arguments, environment, paired_ratios, peak_rss_bytes, resolve_device, summary, sync, write_result

#: (module, attribute, phase): what the child wraps. A missing attribute means this file is out of date.
PER_ROUND_PHASES = (
    ("spectra.editing.base", "key_rows", "key_rows"),
    ("spectra.editing.base", "optimize_targets", "z_optimisation"),
    ("spectra.editing.base", "keys_and_hidden", "keys_forward"),
    ("spectra.editing.memit:MemitEditor", "_solve", "solve"),
    ("spectra.editing.filters:IdentityFilter", "__call__", "filter"),
    ("spectra.editing.filters:IdentityFilter", "begin_round", "filter"),
    ("spectra.editing.filters:ReviveFilter", "__call__", "filter"),
    ("spectra.editing.filters:ReviveFilter", "begin_round", "filter"),
)
ONCE_PHASES = (
    ("spectra.editing.base", "generate_templates", "templates"),
    ("spectra.editing.stats:KeyStatistics", "second_moments", "key_statistics"),
)
#: The arms, named as `spectra drift --revive` names them.
ARMS = ("off", "on")


class PhaseClock:
    """Seconds spent per phase, per round (round 0: before the first round); nested calls count once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.round = 0
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._depth = 0

    def wrap(self, target: str, attribute: str, phase: str) -> None:
        """Replace ``target.attribute`` (``module`` or ``module:Class``) by a timed version."""
        import importlib

        module_name, _, class_name = target.partition(":")
        owner: Any = importlib.import_module(module_name)
        if class_name:
            owner = getattr(owner, class_name)
        original = getattr(owner, attribute, None)
        if original is None:
            raise SystemExit(
                f"{target} has no attribute {attribute!r}: the library changed; update PER_ROUND_PHASES/ONCE_PHASES "
                "in benchmarks/bench_edit_loop.py."
            )

        @functools.wraps(original)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return original(*args, **kwargs)
            self._depth += 1
            sync(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[self.round][phase] += time.perf_counter() - start
                self._depth -= 1

        setattr(owner, attribute, timed_call)

    def count_rounds(self) -> None:
        """Advance the round counter at the start of every ``apply_round`` of the MEMIT editor."""
        from spectra.editing.base import LocateEditEditor

        original: Callable[..., Any] = LocateEditEditor.apply_round

        @functools.wraps(original)
        def apply_round(editor: Any, *args: Any, **kwargs: Any) -> Any:
            self.round += 1
            return original(editor, *args, **kwargs)

        LocateEditEditor.apply_round = apply_round  # type: ignore[method-assign]


def warm_statistics(model: str, device: torch.device, cache: Path) -> dict[str, float | bool]:
    """Fill ``cache`` with the key statistics the MEMIT arms will read; returns the once-per-model seconds.

    Builds the editor the way ``run_drift`` does and calls its ``prepare``.
    """
    os.environ["SPECTRA_CACHE"] = str(cache)
    from spectra.editing import make_editor
    from spectra.editing.stats import model_fingerprint
    from spectra.experiments.common import open_model
    from spectra.experiments.drift import DriftConfig, editor_defaults

    clock = PhaseClock(device)
    for target, attribute, phase in ONCE_PHASES:
        clock.wrap(target, attribute, phase)
    config = DriftConfig(model=model, device=str(device))
    loaded = open_model(config)
    defaults, corpus = editor_defaults(loaded, config)
    editor = make_editor(config.editor, defaults, corpus=corpus, progress=False, seed=config.seed)
    hits = [editor.statistics.cache.load(editor.statistics.key(loaded, layer, model_fingerprint(loaded))) is not None
            for layer in editor.hparams.layers]
    editor.prepare(loaded, [])
    return {**clock.seconds[0], "statistics_cache_hit": all(hits)}


def run_arm(
    arm: str, model: str, rounds: int, batch_size: int, tau: float, device: torch.device, cache: Path, workdir: Path
) -> dict[str, Any]:
    """One arm of ``spectra drift`` in this process, instrumented; returns per-round seconds and peak memory."""
    os.environ["SPECTRA_CACHE"] = str(cache)
    import spectra.plots
    from spectra.experiments.drift import DriftConfig, run_drift
    from spectra.results import load_run

    clock = PhaseClock(device)
    for target, attribute, phase in PER_ROUND_PHASES + ONCE_PHASES:
        clock.wrap(target, attribute, phase)
    clock.count_rounds()
    spectra.plots.plot_run = lambda path: None  # figures are not part of the loop
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    config = DriftConfig(
        model=model, device=str(device), rounds=rounds, batch_size=batch_size, revive=arm, tau=[tau],
        out=workdir / "run",
    )
    start = time.perf_counter()
    path = run_drift(config, progress=False)
    wall = time.perf_counter() - start
    rows = load_run(path).rows
    timing = rows[rows["metric"].isin(["seconds_edit", "seconds_observe"])]
    per_round = timing.pivot_table(index="round", columns="metric", values="value", aggfunc="sum")
    edit = {int(r): float(v) for r, v in per_round["seconds_edit"].dropna().items()}
    observe = {int(r): float(v) for r, v in per_round["seconds_observe"].dropna().items()}
    phases = {int(r): dict(values) for r, values in clock.seconds.items()}
    for r, seconds in edit.items():
        measured = sum(phases.get(r, {}).values())
        phases.setdefault(r, {})["other"] = max(0.0, seconds - measured)
    return {
        "arm": arm,
        "model": model,
        "rounds": rounds,
        "batch_size": batch_size,
        "tau": tau,
        "wall_seconds": wall,
        "seconds_edit": edit,
        "seconds_observe": observe,
        "phases": phases,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def run_child(arm: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run one arm in a fresh interpreter (so its peak memory is its own) and read back its JSON."""
    out = workdir / f"{arm}.json"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--model", args.model, "--rounds", str(args.rounds),
        "--batch-size", str(args.batch_size), "--tau", str(args.tau), "--device", args.device,
        "--cache", str(args.cache), "--out", str(out),
    ]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())["results"][0]


def aggregate(children: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-arm summaries over every (repeat, round), and REVIVE on/off ratios paired by (repeat, round)."""
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for child in children:
        by_arm[child["arm"]].append(child)
    arms: dict[str, Any] = {}
    for arm, runs in by_arm.items():
        edit = [s for run in runs for s in run["seconds_edit"].values()]
        observe = [s for run in runs for r, s in run["seconds_observe"].items() if r != "0"]
        phase_names = sorted({p for run in runs for r, ph in run["phases"].items() if r != "0" for p in ph})
        phases = {
            p: summary([run["phases"].get(r, {}).get(p, 0.0) for run in runs for r in run["seconds_edit"]])
            for p in phase_names
        }
        shares = {
            p: summary([run["phases"].get(r, {}).get(p, 0.0) / s for run in runs for r, s in run["seconds_edit"].items()])
            for p in phase_names
        }
        arms[arm] = {
            "seconds_edit_per_round": summary(edit),
            "seconds_observe_per_round": summary(observe),
            "phase_seconds_per_round": phases,
            "phase_share_of_edit": shares,
            "prepare_seconds_per_arm": summary([sum(run["phases"].get("0", {}).values()) for run in runs]),
            "peak_rss_bytes": summary([run["peak_rss_bytes"] for run in runs]),
            "wall_seconds": summary([run["wall_seconds"] for run in runs]),
        }
        if runs[0]["peak_cuda_bytes"] is not None:
            arms[arm]["peak_cuda_bytes"] = summary([run["peak_cuda_bytes"] for run in runs])
    ratios = {}
    if "off" in by_arm and "on" in by_arm:
        pairs = list(zip(by_arm["on"], by_arm["off"]))
        on_edit = [on["seconds_edit"][r] for on, off in pairs for r in on["seconds_edit"] if r in off["seconds_edit"]]
        off_edit = [off["seconds_edit"][r] for on, off in pairs for r in on["seconds_edit"] if r in off["seconds_edit"]]
        ratios = {
            "edit_on_over_off": paired_ratios(on_edit, off_edit),
            "peak_rss_on_over_off": paired_ratios([on["peak_rss_bytes"] for on, _ in pairs],
                                                  [off["peak_rss_bytes"] for _, off in pairs]),
        }
    return {"arms": arms, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="Model alias or directory (default: the embedded tiny model).")
    parser.add_argument("--rounds", type=int, default=3, help="MEMIT rounds per arm (default 3).")
    parser.add_argument("--batch-size", type=int, default=100, help="Edits per round (default 100, as `make demo`).")
    parser.add_argument("--tau", type=float, default=0.1, help="REVIVE energy threshold of the 'on' arm (default 0.1).")
    parser.add_argument("--repeats", type=int, default=2, help="Pairs of (off, on) processes (default 2).")
    parser.add_argument("--arm", choices=ARMS, default=None,
                        help="Run only this arm, in this process (what each child of a full run does).")
    parser.add_argument("--cache", type=Path, default=None,
                        help="Key-statistics cache root the arms read [default: spectra's, $SPECTRA_CACHE or "
                             "~/.cache/spectra]; filled first if it lacks them.")
    add_common_arguments(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory(prefix="spectra-bench-") as tmp:
        workdir = Path(tmp)
        if args.cache is None:
            from spectra.spectral import default_cache_root

            args.cache = default_cache_root()
        if args.arm is not None:
            payload = {"benchmark": "edit_loop_arm", "results": [run_arm(
                args.arm, args.model, args.rounds, args.batch_size, args.tau, device, args.cache, workdir)]}
            print(f"wrote {write_result('edit_loop_arm', payload, args.out)}")
            return
        print("edit loop: key statistics and templates (once per model) ...", flush=True)
        once = warm_statistics(args.model, device, args.cache)
        print("  " + "  ".join(f"{p} {s:.1f} s" for p, s in once.items() if isinstance(s, float))
              + f"  (statistics cache {'hit' if once['statistics_cache_hit'] else 'miss'})", flush=True)
        children = []
        for repeat in range(args.repeats):
            for arm in (("off", "on") if repeat % 2 == 0 else ("on", "off")):
                print(f"edit loop: repeat {repeat + 1}/{args.repeats}, REVIVE {arm} ...", flush=True)
                child = run_child(arm, args, workdir / f"{repeat}-{arm}")
                child["repeat"] = repeat
                children.append(child)
                edit = statistics.median(child["seconds_edit"].values())
                print(f"  {edit:.2f} s per round, peak RSS {child['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    result = {"once_per_model_seconds": once, **aggregate(children)}
    for arm, values in result["arms"].items():
        share = values["phase_share_of_edit"]
        print(f"{arm}: " + "  ".join(f"{p} {s['median']:.2%}" for p, s in share.items()))
    payload = {
        "benchmark": "edit_loop",
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "arm", "cache")},
        **result,
        "children": children,
    }
    print(f"wrote {write_result('edit_loop', payload, args.out)}")


if __name__ == "__main__":
    main()
