"""``spectra editability``: does a model hold facts where MEMIT assumes, and what does one edit cost it?

A model edits like a pretrained LLM when its facts sit in the MLPs of the edited blocks at the
subject's last token and one edit moves each edited weight by a small part of its spectral norm.
This command measures both on the unedited model, with the editor's own hyperparameters:

- **storage**: calibration (P(true object) before editing), the causal trace as the share of the
  clean-corrupted gap that one restored block output recovers, and at every edited block the MLP's
  write at the subject against the hidden state, the subject keys against the corpus keys, and how
  many directions the key covariance C fills;
- **cost**: single edits, each from the original weights, with ``||dW||_2 / sigma_1(W)`` per site
  split exactly into three factors (``edit_cost``), so a reader sees which one is out of range, and
  how far the edit moved the state at the last edited block and the lookup position (where MEMIT's
  z lives): the move the model's readout needs, which sets the write demand.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from spectra.data.records import EditRequest
from spectra.editing.base import LocateEditEditor
from spectra.editing.core import key_rows, keys_and_hidden, lookup_index
from spectra.editing.stats_import import ImportedStatistics
from spectra.errors import SpectraError
from spectra.evaluation.counterfact import counterfact_rows, prepare_counterfact
from spectra.evaluation.rows import aggregate
from spectra.evaluation.scoring import encode_pairs, pad_id_of, score_continuations
from spectra.evaluation.tracing import causal_trace
from spectra.experiments.common import CommonOptions, open_model
from spectra.experiments.drift import DriftConfig, drift_inputs
from spectra.experiments.probes import restored, trace_rows
from spectra.glossary import with_units
from spectra.progress import progress_iter
from spectra.models.hooks import capture_hidden, capture_inputs
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.models.tokens import pad_right
from spectra.results import check_run_target, create_run
from spectra.spectral import Delta

if TYPE_CHECKING:
    import pandas as pd

#: A block "holds" a fact in the trace when restoring its output recovers at least this share of the
#: clean-corrupted gap (spectra's reading of the issue's "strong" trace).
STRONG_RECOVERY = 0.5
#: An eigenvalue of C counts as a filled direction above this share of the largest one.
FILL_THRESHOLD = 1e-4

#: The targets of an LLM-like editing regime (issue "An embedded model that edits like a pretrained LLM").
TARGETS = {
    "trace": "strong (recovery >= 0.5) over >= 3 consecutive blocks at the subject's last token",
    "mlp_share_subject": ">= 0.10 at every edited block",
    "subject_key_ratio": ">= 0.5 at every edited block",
    "covariance_fill": ">= 0.5 at every edited block",
    "p_true": "median 0.3-0.8",
    "delta_spectral_rel": "a whole round <= 0.1 at every edited site (one edit: well below that)",
}


@dataclass
class EditabilityConfig(DriftConfig):
    """Options of ``spectra editability``: drift's editor, dataset and hyperparameter options, and the sample sizes.

    ``edits`` single edits are made one at a time from the original weights (the first records, or a
    --seed shuffle of them with --shuffle-records); ``facts`` records (a seeded sample) are traced and
    scored for calibration.
    """

    edits: int = 10
    facts: int = 50
    noise: float = 3.0

    #: drift's options that editability takes from the command line; the rest (arms, rounds, observers)
    #: are fixed by __post_init__ or unused, so config.json leaves them out
    INPUT_OPTIONS: ClassVar[tuple[str, ...]] = (
        "editor", "dataset", "shuffle_records", "stats_corpus", "stats", "hparams", "hparams_set", "skip_bad_records")

    def recorded_options(self) -> dict[str, Any]:
        """What config.json records: the common options, the editor and dataset inputs, and the sample sizes."""
        kept = {f.name for f in fields(CommonOptions)} | set(self.INPUT_OPTIONS) | {"edits", "facts", "noise"}
        return {name: getattr(self, name) for name in (f.name for f in fields(self)) if name in kept}

    def __post_init__(self) -> None:
        """One 'round' of ``edits`` records is what drift's input checks count; there are no REVIVE arms."""
        super().__post_init__()
        self.rounds, self.batch_size, self.revive, self.represent_prompts = 1, self.edits, "off", 0

    def validate(self) -> None:
        """Sample sizes that measure something (checked first: drift's round count derives from them), then drift's checks."""
        if self.edits < 1 or self.facts < 1:
            raise SpectraError(f"--edits and --facts must be at least 1 (got {self.edits}, {self.facts}).")
        if self.noise < 0:
            raise SpectraError(f"--noise is a multiple of the embeddings' std and must be non-negative; got {self.noise}.")
        super().validate()


def edit_cost(weight: torch.Tensor, key: torch.Tensor, delta: Delta, sigma1: float) -> dict[str, float]:
    """``||dW||_2 / sigma_1`` of one edit at one site and its exact factors (their product is the ratio).

    - ``write_demand`` = ||dW k|| / ||W k||: how many times the MLP's own output at the subject the
      edit changes it by;
    - ``key_gain`` = ||W k|| / (||k|| sigma_1): how strongly W acts on the subject key, against its
      strongest direction (1: the key is W's top right singular vector);
    - ``off_key_excess`` = ||dW||_2 ||k|| / ||dW k|| >= 1: how much more the update stretches some
      other direction than the key it was solved for (large when the solve spends norm in directions
      the corpus keys barely use).
    """
    W, k = weight.double(), key.double().reshape(-1)
    update = delta.to(dtype=torch.float64, device=W.device)
    written = update.left @ (update.right.T @ k) if update.is_factored else update.to_dense() @ k
    own, moved, key_norm = float((W @ k).norm()), float(written.norm()), float(k.norm())
    norm = update.spectral_norm()
    if min(own, moved, key_norm, sigma1) <= 0:
        raise SpectraError("An edit cost needs a non-zero key, MLP output, written change and sigma_1.")
    return {"delta_spectral_rel": norm / sigma1, "write_demand": moved / own, "key_gain": own / (key_norm * sigma1),
            "off_key_excess": norm * key_norm / moved}


def isotropic_key_gain(weight: torch.Tensor, sigma1: float) -> float:
    """RMS gain of W on isotropic random keys against sigma_1: ||W||_F / (sqrt(n) sigma_1) = sqrt(stable rank / n).

    The reference for ``key_gain``: a subject key that W amplifies more than a random direction
    reads above it. A Gaussian (out m, in n) matrix gives about sqrt(m) / (sqrt(m) + sqrt(n)).
    """
    return float(weight.double().norm()) / (weight.shape[1] ** 0.5 * sigma1)


def corpus_key_gain(weight: torch.Tensor, covariance: torch.Tensor, sigma1: float) -> float:
    """Gain of W on the statistics corpus's keys against sigma_1: sqrt(E||W k||^2 / E||k||^2) / sigma_1,
    i.e. sqrt(tr(W C W^T) / tr C) / sigma_1 with C = E[k k^T].

    Beside ``key_gain`` it tells whether W's strongest directions serve the text at large (corpus
    gain above the subject keys') or no keys in particular (both near the isotropic gain).
    """
    W, C = weight.double(), covariance.double().to(weight.device)
    return float(((W @ C) * W).sum().clamp_min(0).sqrt() / torch.trace(C).sqrt()) / sigma1


class _CostRecorder:
    """A pass-through site filter that records each site's edit cost just before the editor writes it.

    It is called after the solve with the model as the editor sees it (the lower layers' updates
    already written), so the key it reads is the one the editor solved for.
    """

    def __init__(self, model: LoadedModel, request: EditRequest, templates: Sequence[str], key_position: str,
                 batch_size: int, sigma1: dict[Site, float]) -> None:
        self.model = model
        self.rows = key_rows(model, [request], templates, key_position)
        self.batch_size = batch_size
        self.sigma1 = sigma1
        self.costs: dict[Site, dict[str, float]] = {}

    def begin_round(self, model: LoadedModel) -> None:
        """Nothing to rebuild: the recorder only looks."""

    def __call__(self, site: Site, delta: Delta) -> Delta:
        keys, _ = keys_and_hidden(self.model, self.rows, [site.layer], None, self.batch_size)
        weight = self.model.adapter.read(site)
        self.costs[site] = edit_cost(weight, keys[site.layer][:, 0], delta, self.sigma1[site])
        return delta


def calibration_rows(model: LoadedModel, records: Sequence[dict]) -> list[dict]:
    """P(target_true) and P(target_new) after each record's rewrite prompt, before any edit (whole continuations)."""
    tokenizer = model.tokenizer
    pairs = []
    for record in records:
        rewrite = record["requested_rewrite"]
        prompt = rewrite["prompt"].format(rewrite["subject"])
        pairs += [(prompt, rewrite["target_true"]["str"]), (prompt, rewrite["target_new"]["str"])]
    scores = score_continuations(model.model, encode_pairs(tokenizer, pairs), pad_id_of(tokenizer))
    rows = []
    for i, record in enumerate(records):
        for metric, score in (("p_true", scores[2 * i]), ("p_new", scores[2 * i + 1])):
            rows.append({"metric": metric, "case_id": record["case_id"], "value": math.exp(-float(score.token_nll.sum()))})
    return rows


@torch.no_grad()
def subject_activations(model: LoadedModel, records: Sequence[dict], layers: Sequence[int],
                        key_position: str = "subject_last") -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Keys and block outputs at the lookup position (the subject's last token, or the last one) of each record's
    rewrite prompt: ({layer: (n, d_k)}, {layer: (n, d)})."""
    tokenizer = model.tokenizer
    ids, positions = [], []
    for record in records:
        rewrite = record["requested_rewrite"]
        ids.append(tokenizer(rewrite["prompt"].format(rewrite["subject"]))["input_ids"])
        positions.append(lookup_index(model, rewrite["prompt"], rewrite["subject"], key_position))
    batch = pad_right(ids, pad_id_of(tokenizer))
    at, pos = torch.arange(len(ids), device=model.device), torch.tensor(positions, device=model.device)
    with ExitStack() as stack:
        keys = stack.enter_context(capture_inputs(model, layers))
        states = [stack.enter_context(capture_hidden(model, layer)) for layer in layers]
        model.model(input_ids=batch.input_ids.to(model.device), attention_mask=batch.attention_mask.to(model.device))
    hidden = {layer: captured[layer][at, pos].double() for layer, captured in zip(layers, states)}
    return {layer: keys[layer][at, pos].double() for layer in layers}, hidden


@torch.no_grad()
def storage_rows(model: LoadedModel, records: Sequence[dict], covariances: dict[int, torch.Tensor],
                 sigma1: dict[Site, float]) -> list[dict]:
    """At each edited site, over the records' rewrite prompts at the subject's last token (means over records).

    ``mlp_share_subject`` = ||W k|| / ||h|| (the MLP's write against the block's output), and
    ``subject_key_ratio`` = RMS ||k|| at the subject / RMS ||k|| over the corpus (sqrt tr C);
    ``covariance_fill`` = share of C's eigenvalues above ``FILL_THRESHOLD`` of the largest;
    ``key_gain_isotropic`` = the key gain random keys would see (``isotropic_key_gain``), and
    ``key_gain_corpus`` = the one the corpus keys see (``corpus_key_gain``).
    """
    sites = list(sigma1)
    keys, hidden = subject_activations(model, records, sorted({site.layer for site in sites}))
    rows = []
    for site in sites:
        weight = model.adapter.read(site)
        k, h = keys[site.layer], hidden[site.layer]
        writes = k @ weight.double().T
        C = covariances[site.layer].double()
        eigenvalues = torch.linalg.eigvalsh(C)
        values = {
            "mlp_share_subject": float((writes.norm(dim=1) / h.norm(dim=1)).mean()),
            "subject_key_ratio": float(k.pow(2).sum(1).mean().sqrt() / torch.trace(C).clamp_min(0).sqrt()),
            "covariance_fill": float((eigenvalues > FILL_THRESHOLD * eigenvalues.max()).double().mean()),
            "key_gain_isotropic": isotropic_key_gain(weight, sigma1[site]),
            "key_gain_corpus": corpus_key_gain(weight, C, sigma1[site]),
        }
        rows += [{"metric": metric, "site": str(site), "layer": site.layer, "value": value} for metric, value in values.items()]
    return rows


def run_editability(config: EditabilityConfig, progress: bool = True) -> Path:
    """Measure storage and single-edit costs on the unedited model; write them as a finished run."""
    from spectra.editing import make_editor

    config.validate()
    check_run_target(config.out)
    inputs = drift_inputs(config)
    writer = create_run("editability", config.recorded_options(), out=config.out, provenance=inputs.provenance)
    with writer.running():
        model = open_model(config, inputs.tokenizer)
        imported = ImportedStatistics(inputs.statistics) if inputs.statistics is not None else None

        def new_editor() -> LocateEditEditor:
            return make_editor(config.editor, hparams=inputs.hparams.hparams, corpus=inputs.corpus,
                               statistics=imported, progress=progress)

        editor = new_editor()
        sites = editor.edited_sites(model)
        originals = {site: model.adapter.read(site).clone() for site in sites}
        sigma1 = {site: float(torch.linalg.matrix_norm(w.double(), ord=2)) for site, w in originals.items()}
        facts = random.Random(config.seed).sample(inputs.records, min(config.facts, len(inputs.records)))
        trace = causal_trace(model, facts, noise_scale=config.noise, seed=config.seed)
        rows = calibration_rows(model, facts) + trace_rows(trace)
        covariances = editor.statistics.second_moments(model, sorted({s.layer for s in sites}))
        rows += storage_rows(model, facts, covariances, sigma1)
        for record in progress_iter(inputs.records[: config.edits], "single edits", enabled=None if progress else False):
            rows += _single_edit_rows(model, new_editor(), record, originals, sigma1)
        writer.add_rows(with_units({"experiment": "editability", "editor": config.editor, **row} for row in rows))
        return writer.finalize()


def _single_edit_rows(model: LoadedModel, editor: LocateEditEditor, record: dict, originals: dict[Site, torch.Tensor],
                      sigma1: dict[Site, float]) -> list[dict]:
    """One edit from the original weights: its cost per site and whether it took (efficacy 100 or 0, as drift scores it)."""
    request = EditRequest.from_counterfact(record)
    top, position = max(site.layer for site in originals), editor.hparams.key_position
    with restored(model, originals):
        before = subject_activations(model, [record], [top], position)[1][top][0]
        editor.prepare(model, [request])
        recorder = _CostRecorder(model, request, editor.templates, editor.hparams.key_position,
                                 editor.hparams.batch_size, sigma1)
        editor.apply_round(model, [request], recorder)
        after = subject_activations(model, [record], [top], position)[1][top][0]
        plan = prepare_counterfact(model.tokenizer, [record]).restricted(("rewrite",))
        efficacy = aggregate(counterfact_rows(model.model, plan))["rewrite_success"]
    missing = [str(site) for site in originals if site not in recorder.costs]
    if missing:
        raise SpectraError(f"The {editor.name} editor wrote {', '.join(missing)} without passing the update through "
                           "its site filter, so its cost could not be measured.")
    rows = [{"metric": metric, "site": str(site), "layer": site.layer, "case_id": record["case_id"], "value": value}
            for site, cost in recorder.costs.items() for metric, value in cost.items()]
    shift = float((after - before).norm() / before.norm())
    return rows + [{"metric": "efficacy", "case_id": record["case_id"], "value": efficacy},
                   {"metric": "subject_shift", "layer": top, "case_id": record["case_id"], "value": shift}]


def editability_table(rows: "pd.DataFrame") -> "pd.DataFrame":
    """The run against the LLM-like targets: one line per quantity, with what is required and what was measured."""
    import pandas as pd

    def values(metric: str) -> "pd.DataFrame":
        return rows[rows["metric"] == metric]

    def per_site(metric: str, how: str = "mean") -> str:
        found = values(metric).groupby("site")["value"].agg(how)
        return ", ".join(f"{value:.3g} ({site})" for site, value in found.items())

    recovery = values("trace_recovery")
    subject = recovery[recovery["position"] == "subject_last"].sort_values("layer")
    strong = [int(layer) for layer in subject.loc[subject["value"] >= STRONG_RECOVERY, "layer"]]
    trace = ", ".join(f"{v:.2f}" for v in subject["value"]) + f" (blocks 0-{len(subject) - 1}); longest strong run " \
        f"{_longest_run(strong)} block(s)" if len(subject) else "no trace (the corrupted run kept the fact)"
    p_true = values("p_true")["value"]
    lines = [
        ("causal trace, recovery at the subject's last token", TARGETS["trace"], trace),
        ("MLP write / hidden state at the subject", TARGETS["mlp_share_subject"], per_site("mlp_share_subject")),
        ("subject keys / corpus keys (RMS)", TARGETS["subject_key_ratio"], per_site("subject_key_ratio")),
        ("key-covariance fill", TARGETS["covariance_fill"], per_site("covariance_fill")),
        ("P(true) before editing", TARGETS["p_true"],
         f"median {p_true.median():.3g} (q10 {p_true.quantile(0.1):.3g}, q90 {p_true.quantile(0.9):.3g})"),
        ("one edit: ||dW||_2 / sigma_1, median", TARGETS["delta_spectral_rel"], per_site("delta_spectral_rel", "median")),
        ("  = write_demand (||dW k|| / ||W k||), median", "", per_site("write_demand", "median")),
        ("  x key_gain (||W k|| / (||k|| sigma_1)), median", "isotropic keys: " + per_site("key_gain_isotropic"),
         per_site("key_gain", "median")),
        ("    key_gain of the corpus keys (RMS)", "", per_site("key_gain_corpus")),
        ("  x off_key_excess (||dW||_2 ||k|| / ||dW k||), median", "", per_site("off_key_excess", "median")),
        ("one edit: subject state moved at the last edited block, median",
         "what the readout asks (z's trust region: clamp_norm_factor x ||h||)",
         f"{values('subject_shift')['value'].median():.3g} of ||h||"),
        ("one edit: efficacy", "", f"{values('efficacy')['value'].mean():.0f} % of {len(values('efficacy'))} edits"),
    ]
    return pd.DataFrame(lines, columns=["quantity", "target", "measured"])


def _longest_run(layers: Sequence[int]) -> int:
    """The length of the longest run of consecutive integers in ascending ``layers``."""
    best = current = 0
    for i, layer in enumerate(layers):
        current = current + 1 if i and layer == layers[i - 1] + 1 else 1
        best = max(best, current)
    return best
