"""Render benchmarks/results/*.json as the figures table of benchmarks/README.md (between its markers).

Every row: what was measured, on what sizes, the median with its min-max spread, the ratio of the
comparison taken in the same run (median, min-max), the target and whether it is met. Missing
result files become rows marked "not measured".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
LLAMA_SHAPE = [4096, 14336]
HEADER = "| what | sizes | median | min–max | ratio (median, min–max) | target | met? |\n| --- | --- | --- | --- | --- | --- | --- |"


def seconds(value: float) -> str:
    """A duration with a unit that keeps three significant digits readable."""
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


def spread(stats: dict[str, Any], fmt: Any = seconds) -> str:
    return f"{fmt(stats['min'])} – {fmt(stats['max'])} (n={stats['n']})"


def ratio(stats: dict[str, Any]) -> str:
    return f"{stats['median']:.3g}x ({stats['min']:.3g}–{stats['max']:.3g})"


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def revive_rows(data: dict[str, Any]) -> list[str]:
    rows = []
    for r in data["results"]:
        m, n = r["shape"]
        size = f"{m}x{n}, k={r['k']}"
        s, q = r["seconds"], r["ratios"]
        llama = r["shape"] == LLAMA_SHAPE
        target = "≥100x at 4096x14336" if llama else "—"
        rows.append(row("Algorithm 1 as stated (full SVD of W + all m·n coefficients), per update", size,
                        seconds(s["alg1"]["median"]), spread(s["alg1"]), "—", "—", "—"))
        rows.append(row("… of which the per-update SVD (basis rebuild)", size, seconds(s["alg1_svd"]["median"]),
                        spread(s["alg1_svd"]), "—", "—", "—"))
        rows.append(row("ReviveProjector, dense dW", size, seconds(s["dense"]["median"]), spread(s["dense"]),
                        f"Alg. 1 / this: {ratio(q['alg1_over_dense'])}", target,
                        met(q["alg1_over_dense"]["median"] >= 100) if llama else "—"))
        rows.append(row(f"ReviveProjector, factored dW (b={r['factored_rank']})", size, seconds(s["factored"]["median"]),
                        spread(s["factored"]), f"Alg. 1 / this: {ratio(q['alg1_over_factored'])}", target,
                        met(q["alg1_over_factored"]["median"] >= 100) if llama else "—"))
        rows.append(row("Algorithm 1 with its SVD cached (coefficients only) vs dense projector", size,
                        seconds(s["alg1_coefficients"]["median"]), spread(s["alg1_coefficients"]),
                        f"{ratio(q['alg1_coefficients_over_dense'])}", "—", "—"))
        rows.append(row("ReviveProjector build (thin SVD, once per weight)", size, seconds(s["projector_build"]),
                        "1 run", "—", "—", "—"))
        a = r["agreement"]
        rows.append(row("projector fp32 vs the same projection in float64 (rel. Frobenius error)", size,
                        f"{a['dense_vs_float64_rel_fro']:.1e}", "—", "—", "≤1e-5", met(a["dense_vs_float64_rel_fro"] <= 1e-5)))
        rows.append(row("projector vs Algorithm 1, independent fp32 SVDs (rel. Frobenius difference)",
                        f"{size}, gap (σ_k − σ_k+1)/σ₁ = {a['gap_at_k']:.1e}", f"{a['dense_vs_alg1_rel_fro']:.1e}",
                        "—", "—", "—", "—"))
        rows.append(row("factored vs dense projection (rel. Frobenius difference)", size,
                        f"{a['factored_vs_dense_projector_rel_fro']:.1e}", "—", "—", "≤1e-5",
                        met(a["factored_vs_dense_projector_rel_fro"] <= 1e-5)))
    return rows


def svd_rows(data: dict[str, Any]) -> list[str]:
    rows = []
    for r in data["results"]:
        shapes = ", ".join("x".join(map(str, s)) for s in r["shapes"])
        size = f"{r['model']}: {r['matrices']} FFN matrices ({shapes})"
        s = r["seconds"]
        rows.append(row("spectra `svd_many` (U, S, Vh)", size, seconds(s["spectra"]["median"]), spread(s["spectra"]),
                        "—", "—", "—"))
        for method, stats in r["ratio_over_spectra"].items():
            is_ww = method == "weightwatcher"
            rows.append(row(f"{method} / spectra", size, seconds(s[method]["median"]), spread(s[method]), ratio(stats),
                            "≥3x" if is_ww else "—", met(stats["median"] >= 3) if is_ww else "—"))
        if r.get("weightwatcher_over_spectra_cached"):
            rows.append(row("weightwatcher / spectra_cached (repeat analysis of unchanged weights)", size,
                            seconds(s["weightwatcher"]["median"]), spread(s["weightwatcher"]),
                            ratio(r["weightwatcher_over_spectra_cached"]), "—", "—"))
        if not r["weightwatcher"]:
            rows.append(row("weightwatcher", size, "not measured: weightwatcher not installed", "—", "—", "≥3x", "—"))
        errors = r["max_rel_error_vs_float64"]
        rows.append(row("spectra's singular values vs float64 LAPACK (max abs Δσ / σ₁)", size,
                        f"{errors['spectra']:.1e}", "—", "—", "≤1e-5", met(errors["spectra"] <= 1e-5)))
        others = {method: error for method, error in errors.items() if method != "spectra"}
        if others:
            worst = max(others, key=others.get)
            rows.append(row(f"… the least accurate other method ({worst})", size, f"{others[worst]:.1e}", "—", "—", "—",
                            "—"))
    return rows


def edit_loop_rows(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    size = f"{settings['model']}, {settings['rounds']} rounds x {settings['batch_size']} edits, tau={settings['tau']}"
    arms, ratios = data["arms"], data.get("ratios", {})
    rows = []
    for arm in ("off", "on"):
        if arm not in arms:
            continue
        a = arms[arm]
        extra = f"on / off: {ratio(ratios['edit_on_over_off'])}" if arm == "on" and ratios else "—"
        rows.append(row(f"MEMIT round, REVIVE {arm} (seconds_edit)", size, seconds(a["seconds_edit_per_round"]["median"]),
                        spread(a["seconds_edit_per_round"]), extra, "—", "—"))
        share = ", ".join(f"{p} {v['median']:.2%}" for p, v in
                          sorted(a["phase_share_of_edit"].items(), key=lambda kv: -kv[1]["median"]))
        rows.append(row(f"… where it goes (REVIVE {arm}, median share)", size, share, "—", "—", "—", "—"))
        mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731 - a one-line formatter
        extra = f"on / off: {ratio(ratios['peak_rss_on_over_off'])}" if arm == "on" and ratios else "—"
        rows.append(row(f"peak resident memory, REVIVE {arm} (whole `spectra drift` process)", size,
                        mib(a["peak_rss_bytes"]["median"]), spread(a["peak_rss_bytes"], mib), extra, "—", "—"))
        rows.append(row(f"observers per round, REVIVE {arm} (seconds_observe)", size,
                        seconds(a["seconds_observe_per_round"]["median"]), spread(a["seconds_observe_per_round"]),
                        "—", "—", "—"))
    if "on" in arms:
        share = arms["on"]["phase_share_of_edit"]["filter"]
        rows.append(row("REVIVE filter's share of a MEMIT round", size, f"{share['median']:.2%}",
                        spread(share, lambda v: f"{v:.2%}"), "—", "< 1 %", met(share["median"] < 0.01)))
    once = data.get("once_per_model_seconds", {})
    if once:
        state = "cache hit: computed by an earlier run" if once["statistics_cache_hit"] else "cache miss"
        rows.append(row(f"once per model: key statistics ({state})", size, seconds(once["key_statistics"]),
                        "1 run", "—", "—", "—"))
        rows.append(row("once per model: context templates", size, seconds(once["templates"]), "1 run", "—", "—", "—"))
    return rows


def environment_line(name: str, data: dict[str, Any]) -> str:
    env = data["environment"]
    v = env["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "numpy", "scipy", "transformers", "weightwatcher") if v.get(k))
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    return (f"- `{name}`: {env['date']}; {env['cpu']}, {env['cores']} cores (torch threads {env['torch_threads']}, "
            f"OMP_NUM_THREADS={env['omp_num_threads']}), {env['memory_gib']} GiB{gpu}, load average at the end "
            f"{env['load_average_1min']}; device {env['device']}; "
            f"Python {env['python']}, {versions}; spectra {env['git']}")


def precision_rows(data: dict[str, Any]) -> list[str]:
    """One row per editor and dtype: seconds per round, efficacy, and the update's distance from the CPU float32 one."""
    rows = []
    cpu = {r["editor"]: r["seconds"] for r in data["results"] if r["device"] == "cpu"}
    for r in data["results"]:
        size = f"tiny, 1 round x {data['batch_size']} edits"
        where = f"{r['editor']} on {r['device']}, {r['dtype']}"
        on_device = r["device"] != "cpu"
        speed = f"CPU float32 / this: {cpu[r['editor']]['median'] / r['seconds']['median']:.3g}x" if on_device else "—"
        rows.append(row(f"{where}: seconds per round", size, seconds(r["seconds"]["median"]), spread(r["seconds"]),
                        speed, "—", "—"))
        finite = "" if r["finite"] else " (update not finite)"
        rows.append(row(f"{where}: efficacy; update vs CPU float32 (rel. Frobenius, worst site)", size,
                        f"{r['efficacy']:.1f} %; {r['update_difference']:.1e}{finite}", "—", "—", "—", "—"))
    return rows


def render(results: Path) -> str:
    """The Markdown that goes between the README markers: each benchmark's CPU figures, then its GPU ones
    (``<name>_cuda.json``, written by ``run_all.py --device cuda``)."""
    sections = [("revive", "REVIVE filter", revive_rows), ("svd", "Spectral pass", svd_rows),
                ("edit_loop", "Edit loop (MEMIT on the embedded model)", edit_loop_rows)]
    lines: list[str] = []
    provenance: list[str] = []
    for name, title, make_rows in sections:
        lines += [f"### {title}", "", HEADER]
        path = results / f"{name}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            lines += make_rows(data)
            provenance.append(environment_line(name, data))
        else:
            lines.append(row(title, "—", f"not measured: no {path.name} yet", "—", "—", "—", "—"))
        path = results / f"{name}_cuda.json"
        if path.is_file():
            data = json.loads(path.read_text())
            lines += ["", f"On a GPU ({data['environment']['gpu']}):", "", HEADER, *make_rows(data)]
            provenance.append(environment_line(f"{name}_cuda", data))
        else:
            lines.append(row(f"{title} on a GPU", "as above", "not measured: no GPU in the sessions that ran it",
                             "—", "—", "—", "run `python benchmarks/run_all.py --device cuda`"))
        lines.append("")
    path = results / "precision.json"
    lines += ["### Editors on a device and in half precision", "", HEADER]
    if path.is_file():
        data = json.loads(path.read_text())
        lines += precision_rows(data)
        provenance.append(environment_line("precision", data))
    else:
        lines.append(row("Editors in half precision", "—", "not measured: no precision.json yet", "—", "—", "—",
                         "run `python benchmarks/bench_precision.py --device cuda`"))
    lines.append("")
    return "\n".join(lines + ["Measured on:", "", *provenance])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results", help="Directory of the result JSON files.")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md", help="README whose figures section to replace.")
    args = parser.parse_args()
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme} lacks the markers {BEGIN} and {END}; add them where the table belongs.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{BEGIN}\n{render(args.results)}\n{END}{tail}")
    print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
