"""Editors on a device and in half precision: seconds per round, efficacy, and how far the update moves from
the CPU float32 one.

Each editor (MEMIT, AlphaEdit, RECT, PRUNE, NSE, with the embedded model's defaults) edits the first
``--batch-size`` facts of the tiny world in one round, from the original weights, on the CPU in float32
(the reference, one round) and on ``--device`` in each ``--dtypes``. Per editor and dtype it records:

- ``seconds``: one round (``prepare`` and ``apply_round``; key statistics and context templates are
  computed once beforehand and cached, so no repetition pays them), median over ``--repeats`` rounds
  on the device (one on the CPU), each from the original weights;
- ``efficacy``: the share of the edited facts whose new target outscores the true one afterwards, as
  drift scores it (rewrite prompts);
- ``update_difference``: ||dW - dW_ref||_F / ||dW_ref||_F, largest over the edited sites, where dW_ref is
  the CPU float32 update. In float32 it shows the device's arithmetic; in half precision, the dtype's.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from common import add_common_arguments, environment, relative_error, resolve_device, summary, timed, write_result

from spectra.data.records import EditRequest
from spectra.editing import IdentityFilter, make_editor
from spectra.evaluation.counterfact import counterfact_rows, prepare_counterfact
from spectra.evaluation.rows import aggregate
from spectra.experiments.common import open_model
from spectra.experiments.drift import EDITOR_NAMES, DriftConfig, drift_inputs
from spectra.experiments.probes import restored
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site

DTYPES = ("float32", "bfloat16", "float16")


def edit_once(config: DriftConfig, repeats: int) -> tuple[dict[Site, torch.Tensor], dict[str, Any]]:
    """One round of the first ``config.batch_size`` facts, ``repeats`` times from the original weights: the
    update (float32, on the CPU) and the round's figures."""
    inputs = drift_inputs(config)
    model: LoadedModel = open_model(config, inputs.tokenizer)
    records = inputs.records[: config.batch_size]
    requests = [EditRequest.from_counterfact(record) for record in records]

    def new_editor():
        return make_editor(config.editor, hparams=inputs.hparams.hparams, corpus=inputs.corpus, progress=False)

    sites = new_editor().edited_sites(model)
    originals = {site: model.adapter.read(site).clone() for site in sites}
    warm = new_editor()
    warm.prepare(model, requests[:1])  # key statistics and templates, cached for every timed round
    seconds: list[float] = []
    for repeat in range(repeats):
        with restored(model, originals):
            editor = new_editor()

            def one_round() -> dict:
                editor.prepare(model, requests)
                return editor.apply_round(model, requests, IdentityFilter())

            elapsed, written = timed(one_round, model.device)
            seconds.append(elapsed)
            if repeat == repeats - 1:  # every repetition edits the same facts the same way: score the last one
                updates = {site: delta.to_dense().float().cpu() for site, delta in written.items()}
                plan = prepare_counterfact(model.tokenizer, records).restricted(("rewrite",))
                efficacy = aggregate(counterfact_rows(model.model, plan))["rewrite_success"]
    finite = all(bool(torch.isfinite(u).all()) for u in updates.values())
    return updates, {"seconds": summary(seconds), "efficacy": efficacy, "finite": finite}


def difference(updates: dict[Site, torch.Tensor], reference: dict[Site, torch.Tensor]) -> float:
    """Largest relative Frobenius distance of an update from the reference update over the edited sites."""
    return max(relative_error(updates[site], ref) for site, ref in reference.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editors", nargs="+", choices=EDITOR_NAMES, default=list(EDITOR_NAMES), help="Editors to run.")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="Model dtypes on --device.")
    parser.add_argument("--batch-size", type=int, default=100, help="Edits in the round (default 100, as `make demo`).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds per editor and dtype (default 3).")
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.repeats < 1 or args.batch_size < 1:
        parser.error(f"--repeats and --batch-size must be at least 1 (got {args.repeats}, {args.batch_size}).")
    device = resolve_device(args.device)
    results: list[dict[str, Any]] = []
    for editor in args.editors:
        def config(where: str, dtype: str) -> DriftConfig:
            return DriftConfig(model="tiny", editor=editor, rounds=1, batch_size=args.batch_size, device=where,
                               dtype=dtype, represent_prompts=0)

        reference, figures = edit_once(config("cpu", "float32"), 1)
        results.append({"editor": editor, "device": "cpu", "dtype": "float32", **figures, "update_difference": 0.0})
        print(f"{editor:9s} cpu  float32  {figures['seconds']['median']:7.2f} s  efficacy {figures['efficacy']:5.1f} %",
              flush=True)
        for dtype in args.dtypes:
            updates, figures = edit_once(config(str(device), dtype), args.repeats)
            gap = difference(updates, reference)
            results.append({"editor": editor, "device": str(device), "dtype": dtype, **figures, "update_difference": gap})
            print(f"{editor:9s} {device!s:4s} {dtype:8s} {figures['seconds']['median']:7.2f} s  efficacy "
                  f"{figures['efficacy']:5.1f} %  update vs CPU float32 {gap:.1e}", flush=True)
        # Written after every editor, so that a run stopped at a time limit keeps the editors it finished.
        payload = {"batch_size": args.batch_size, "repeats": args.repeats, "results": results,
                   "environment": environment(device)}
        path = write_result("precision", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
