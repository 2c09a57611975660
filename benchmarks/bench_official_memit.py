"""A spectra MEMIT round against the official ``apply_memit_to_model`` (kmeng01/memit) doing the same work.

One process, two copies of one seeded random GPT-2 (no weights can be downloaded here; timing
does not depend on trained values), the same requests, context templates, covariance and
hyperparameters. The random model never reaches the 5e-2 early-stop loss, so both sides take all
20 z steps per request. Runs alternate official, spectra; each pair gives one ratio. Each pair's
ΔW is checked against the other side's (``dW rel``), so a ratio never compares different work.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_official_memit.py --official /tmp/ref/memit

``--official`` is an extracted kmeng01/memit tree (see tests/fixtures/parity/README.md); it is
copied to a scratch folder and only its device strings are patched, as for the parity fixtures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures" / "parity")]
from parity_support import PinnedStatistics, down_weights, load_tokenizer, relative_difference  # noqa: E402
from regenerate import (  # noqa: E402
    CITIES, JOBS, LANGUAGES, MODULES, PEOPLE, TEMPLATES, enter_official_tree, official_hparams, patch_tree, tuple_outputs,
)

from spectra.data.records import EditRequest  # noqa: E402
from spectra.editing import IdentityFilter, MemitHParams  # noqa: E402
from spectra.editing.memit import MemitEditor  # noqa: E402
from spectra.editing.stats import accumulate_second_moments  # noqa: E402
from spectra.models.adapters import adapter_for  # noqa: E402
from spectra.models.loading import LoadedModel  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "official_memit.json"
LAYERS = [2, 3]
SETTINGS: dict[str, Any] = {
    "layers": LAYERS, "v_loss_layer": 5, "fact_token": "subject_last", "mom2_update_weight": {"gpt2": 10.0},
    "z": dict(v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625),
}


def build_model() -> torch.nn.Module:
    """A seeded random 6-layer GPT-2 (d 256, d_k 1024) over the parity tokenizer, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer()
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=256, n_layer=6, n_head=8, n_positions=64,
                        bos_token_id=special, eos_token_id=special)
    model = GPT2LMHeadModel(config).eval()
    model.config._name_or_path = "bench-gpt2"
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def make_requests(n: int) -> list[dict[str, Any]]:
    """``n`` requests on distinct (subject, prompt) pairs: the parity world's 12 people under four prompts."""
    rng = random.Random(n)
    relations = [("{} lives in", CITIES), ("{} works as a", JOBS), ("{} speaks", LANGUAGES), ("The home city of {} is", CITIES)]
    pairs = [(person, prompt, pool) for prompt, pool in relations for person in PEOPLE]
    if n > len(pairs):
        raise SystemExit(f"at most {len(pairs)} requests")
    return [dict(case_id=i, prompt=prompt, subject=person, target_new=rng.choice(pool))
            for i, (person, prompt, pool) in enumerate(rng.sample(pairs, n))]


def main() -> None:
    """Time both sides over ``--sizes`` and write results/official_memit.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="an extracted kmeng01/memit tree")
    parser.add_argument("--sizes", default="8,16,32", help="requests per round, comma-separated")
    parser.add_argument("--reps", type=int, default=5, help="timed pairs per size (after one warm-up pair)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-official-memit-") as scratch:
        bench(args, Path(scratch))


def bench(args: argparse.Namespace, scratch: Path) -> None:
    """``main`` with a scratch folder for the patched official tree."""
    patch_tree(args.official.resolve(), scratch / "memit", "memit")
    enter_official_tree(scratch / "memit")
    import memit.memit_main as official
    from memit import MEMITHyperParams

    tokenizer = load_tokenizer()
    models = {"official": build_model(), "spectra": build_model()}
    lm = LoadedModel(models["spectra"], tokenizer, adapter_for(models["spectra"]), "bench-gpt2", "random")
    documents = [d for d in (ROOT / "tests/fixtures/parity/stats_corpus.txt").read_text().splitlines() if d]
    sums, count = accumulate_second_moments(lm, LAYERS, documents, max_length=64, batch_size=64, progress=False)
    covariances = {layer: (sums[layer] / count).float() for layer in LAYERS}
    official.CONTEXT_TEMPLATES_CACHE = [[TEMPLATES[0]], TEMPLATES[1:]]
    for layer in LAYERS:
        official.COV_CACHE[("bench-gpt2", MODULES["gpt2"]["rewrite_module_tmp"].format(layer))] = covariances[layer]
    hparams = official_hparams(MEMITHyperParams, "gpt2", SETTINGS)
    w0 = down_weights(models["official"], "gpt2", LAYERS)

    def restore(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for layer in LAYERS:
                model.transformer.h[layer].mlp.c_proj.weight.copy_(w0[layer].T)

    def run_official(requests: list[dict[str, Any]]) -> tuple[float, dict[int, torch.Tensor]]:
        restore(models["official"])
        batch = [dict(r, target_new={"str": r["target_new"]}) for r in requests]
        with tuple_outputs(models["official"], "gpt2"), contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            official.apply_memit_to_model(models["official"], tokenizer, batch, hparams)
            seconds = time.perf_counter() - start
        after = down_weights(models["official"], "gpt2", LAYERS)
        return seconds, {layer: after[layer] - w0[layer] for layer in LAYERS}

    def run_spectra(requests: list[dict[str, Any]]) -> tuple[float, dict[int, torch.Tensor]]:
        restore(models["spectra"])
        batch = [EditRequest(case_id=r["case_id"], prompt=r["prompt"], subject=r["subject"], target_new=r["target_new"])
                 for r in requests]
        editor = MemitEditor(
            MemitHParams(layers=tuple(LAYERS), key_position="subject_last", mom2_update_weight=10.0, ridge=0.0,
                         mom2_n_samples=None, max_length=64, **SETTINGS["z"]),
            statistics=PinnedStatistics(covariances), progress=False)
        editor.templates = list(TEMPLATES)
        editor.prepare(lm, batch)
        start = time.perf_counter()
        editor.apply_round(lm, batch, IdentityFilter())
        seconds = time.perf_counter() - start
        after = down_weights(models["spectra"], "gpt2", LAYERS)
        return seconds, {layer: after[layer] - w0[layer] for layer in LAYERS}

    results = []
    for n in [int(x) for x in args.sizes.split(",")]:
        requests = make_requests(n)
        run_official(requests), run_spectra(requests)
        pairs = []
        for _ in range(args.reps):
            (t_ref, d_ref), (t_sp, d_sp) = run_official(requests), run_spectra(requests)
            agreement = max(relative_difference(d_sp[layer], d_ref[layer]) for layer in LAYERS)
            pairs.append(dict(official=t_ref, spectra=t_sp, ratio=t_ref / t_sp, dW_rel=agreement))
            print(f"N={n}: official {t_ref:.2f} s, spectra {t_sp:.2f} s, ratio {t_ref / t_sp:.2f}, dW rel {agreement:.1e}", flush=True)
        summary = {key: statistics.median(p[key] for p in pairs) for key in ("official", "spectra", "ratio")}
        results.append(dict(n=n, pairs=pairs, median=summary, ratio_min=min(p["ratio"] for p in pairs),
                            ratio_max=max(p["ratio"] for p in pairs), dW_rel_max=max(p["dW_rel"] for p in pairs)))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": "random GPT-2, 6 layers, d 256, d_k 1024; layers 2-3 edited; 20 z steps; 3 templates",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)", "torch": torch.__version__,
        "git_commit": commit, "date": datetime.date.today().isoformat(), "results": results,
    }, indent=1) + "\n")
    for row in results:
        m = row["median"]
        print(f"N={row['n']:3d}: official {m['official']:.2f} s | spectra {m['spectra']:.2f} s | ratio {m['ratio']:.2f} "
              f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | dW rel <= {row['dW_rel_max']:.1e}")


if __name__ == "__main__":
    main()
