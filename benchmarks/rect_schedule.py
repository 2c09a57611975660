"""RECT's two mask schedules on the embedded tiny model: one round of edits, then what each leaves behind.

'end' is the official MEMIT_rect (solve every layer unmasked, mask once); 'per_layer' masks each
layer's update before the next layer is solved. Both edit the same requests from the same unedited
model with the tiny defaults; the table gives CounterFact efficacy, paraphrase and neighbourhood
success on the edited records and the four general-ability tasks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rect_schedule.py [--edits 100]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import torch

from spectra.data.datasets import resolve_dataset
from spectra.data.records import EditRequest
from spectra.editing import IdentityFilter, make_editor
from spectra.evaluation.counterfact import counterfact_rows, prepare_counterfact
from spectra.evaluation.rows import aggregate
from spectra.experiments.common import GeneralOptions, default_dataset, general_ability
from spectra.experiments.drift import DriftConfig, editor_defaults
from spectra.models.loading import LoadedModel, load_model

RESULTS = Path(__file__).parent / "results" / "rect_schedule.json"
EDIT_METRICS = {"rewrite_success": "efficacy", "paraphrase_success": "paraphrase", "neighborhood_success": "neighbourhood"}


def measure(model: LoadedModel, records: list[dict], ability: object) -> dict[str, float]:
    """Edit metrics on ``records`` (in %) and every general task's accuracy (in %)."""
    values = aggregate(counterfact_rows(model.model, prepare_counterfact(model.tokenizer, records)))
    out = {label: values[name] for name, label in EDIT_METRICS.items()}
    tasks = ability(model.model, model.tokenizer)
    out.update({f"task_{task}": 100 * metrics["accuracy"] for task, metrics in tasks.items()})
    out["general_mean"] = sum(out[f"task_{task}"] for task in tasks) / len(tasks)
    return out


def main() -> None:
    """Measure both schedules and write results/rect_schedule.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=100, help="requests edited in the one round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, dict[str, float]] = {}
    for arm in ("unedited", "end", "per_layer"):
        model = load_model("tiny", device="cpu")
        records = resolve_dataset(default_dataset(model))[1][: args.edits]
        requests = [EditRequest.from_counterfact(r) for r in records]
        defaults, corpus = editor_defaults(model, DriftConfig(editor="rect"))
        ability = general_ability(model, GeneralOptions(), seed=0)
        start = time.perf_counter()
        if arm != "unedited":
            editor = make_editor("rect", defaults, corpus=corpus, progress=False, mask_schedule=arm)
            editor.prepare(model, requests)
            editor.apply_round(model, requests, IdentityFilter())
        rows[arm] = {**measure(model, records, ability), "seconds": time.perf_counter() - start}
        print(arm, {k: round(v, 1) for k, v in rows[arm].items()}, flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "-C", str(RESULTS.parents[2]), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    RESULTS.write_text(json.dumps({"edits": args.edits, "model": "tiny (spectra/assets)", "git_commit": commit,
                                   "date": datetime.date.today().isoformat(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
