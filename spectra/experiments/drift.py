"""``spectra drift``: sequential editing round after round, REVIVE on and off, with spectral and behavioural tracking."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    import pandas as pd

from spectra.data.datasets import resolve_dataset
from spectra.data.records import EditRequest
from spectra.editing.base import Editor
from spectra.editing.filters import IdentityFilter, ReviveFilter, SiteFilter
from spectra.editing.hparams import KNOWN_MODELS
from spectra.editing.loop import Arm, EditLoop, RoundRecord, resume_point
from spectra.errors import SpectraError
from spectra.evaluation.counterfact import CounterFactPlan, counterfact_rows, prepare_counterfact
from spectra.evaluation.general import GeneralAbility, HeldoutText
from spectra.evaluation.representations import hidden_states, joint_tsne, shift_metrics
from spectra.evaluation.rows import aggregate
from spectra.editing.stats import read_corpus, sample_keys
from spectra.experiments.common import (
    CommonOptions, GeneralOptions, ability_rows, default_dataset, general_ability, heldout_text, open_model, world_dir,
)
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.models.tiny import WORLD_FILES
from spectra.results import create_run, resume_run, ss_key
from spectra.spectral import (
    ReviveProjector, Spectrum, drift_stats, functional_change, ls, rank_for_energy, relative_change_rate, ss, ss_best_match, ss_summary, svd,
)

#: Reference metric names -> the names the paper's figures use.
#: Corpus documents whose keys measure each round's functional change (``functional_change`` rows).
FUNCTIONAL_DOCUMENTS = 400

EDIT_METRIC_NAMES = {
    "rewrite_success": "efficacy", "paraphrase_success": "paraphrase", "neighborhood_success": "neighborhood",
    "rewrite_diff": "efficacy_magnitude", "paraphrase_diff": "paraphrase_magnitude",
    "neighborhood_diff": "neighborhood_magnitude", "rewrite_acc": "efficacy_acc",
    "paraphrase_acc": "paraphrase_acc", "neighborhood_acc": "neighborhood_acc", "score": "score",
}


@dataclass
class DriftConfig(CommonOptions):
    """Options of a drift run (every field lands in config.json)."""

    editor: str = "memit"
    rounds: int = 20
    batch_size: int | None = None
    revive: str = "both"
    tau: list[float] = field(default_factory=lambda: [0.1])
    dataset: str = "auto"
    refresh: str = "original"
    placement: str | None = None
    metric_tau: float = 0.1
    ss_every: int = 2
    eval_records: int = 200
    represent_prompts: int = 200
    tsne: bool = False
    stats_corpus: Path | None = None
    general: GeneralOptions = field(default_factory=GeneralOptions)
    resume: Path | None = None

    def validate(self) -> None:
        """Every option checked before any work starts."""
        if self.editor not in EDITOR_NAMES:
            raise SpectraError(f"Unknown editor {self.editor!r}; choose one of {', '.join(EDITOR_NAMES)}.")
        if self.revive not in ("on", "off", "both"):
            raise SpectraError(f"--revive must be on, off or both, not {self.revive!r}.")
        if not self.tau:
            raise SpectraError("Give at least one --tau.")
        for tau in [*self.tau, self.metric_tau]:
            if not 0.0 < tau < 1.0:
                raise SpectraError(f"tau must lie in (0, 1); got {tau}. Give the share of singular-value energy to protect, e.g. 0.1.")
        if self.rounds < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise SpectraError(f"--rounds and --batch-size must be at least 1 (got {self.rounds}, {self.batch_size}).")
        if self.refresh not in ("original", "current"):
            raise SpectraError(f"--refresh must be original or current, not {self.refresh!r}.")
        if self.placement not in (None, "after", "in_solve"):
            raise SpectraError(f"--placement must be after or in_solve, not {self.placement!r}.")
        if self.ss_every < 1 or self.eval_records < 1 or self.represent_prompts < 0:
            raise SpectraError("--ss-every and --eval-records must be at least 1 and --represent-prompts at least 0.")

    def arms(self) -> list[Arm]:
        """The off arm and/or one REVIVE arm per tau, in that order."""
        arms = [Arm("off")] if self.revive in ("off", "both") else []
        if self.revive in ("on", "both"):
            single = len(self.tau) == 1
            arms += [Arm("revive" if single else f"revive@{tau:g}", tau) for tau in self.tau]
        return arms


EDITOR_NAMES = ("memit", "alphaedit", "rect", "prune", "nse")


class SpectralDrift:
    """LS, SS (both sides) with its summaries, and norm growth of every edited site against the original."""

    def __init__(self, originals: dict[Site, torch.Tensor], spectra0: dict[Site, Spectrum], tau: float,
                 ss_every: int, last_round: int, corpus_keys: dict[Site, torch.Tensor] | None = None) -> None:
        self.originals = originals
        self.spectra0 = spectra0
        self.tau = tau
        self.ss_every = ss_every
        self.last_round = last_round
        self.corpus_keys = corpus_keys or {}

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        record = RoundRecord()
        keep_matrices = round % self.ss_every == 0 or round == self.last_round
        for site, s0 in self.spectra0.items():
            Wt = model.adapter.read(site).float().cpu()
            st = svd(Wt)
            context = {"arm": arm.name, "tau": arm.tau, "round": round, "site": str(site)}
            record.rows.append({**context, "metric": "LS", "value": ls(s0, st, self.tau)})
            k = rank_for_energy(s0.S, self.tau)
            protected = rank_for_energy(s0.S, arm.tau) if arm.tau is not None else k
            for side in ("right", "left"):
                matrix = ss(s0, st, k=max(k, protected), side=side)
                for name, value in ss_summary(matrix[:k]).items():
                    record.rows.append({**context, "side": side, "metric": f"SS_{name}", "value": value})
                diag = torch.diagonal(matrix[:protected, :protected])
                record.rows.append({**context, "side": side, "metric": "SS_protected_diag_min", "value": float(diag.min())})
                record.rows.append({**context, "side": side, "metric": "SS_protected_match_min",
                                    "value": ss_best_match(s0, st, protected, side)})
                if keep_matrices:
                    record.tensors[ss_key(side, arm.name, round, str(site))] = matrix[:k].float()
            record.rows.append({**context, "metric": "protected_triplet_residual",
                                "value": triplet_residual(s0, Wt, protected)})
            stats = drift_stats(self.originals[site], Wt, spectrum0=s0, spectrum_t=st)
            for name in ("fro_ratio", "delta_fro", "delta_fro_rel", "delta_spectral_rel", "spectral_norm_ratio",
                         "spectral_norm_t", "condition_number_t", "effective_rank_t"):
                record.rows.append({**context, "metric": name.removesuffix("_t"), "value": stats[name]})
            if site in self.corpus_keys:
                record.rows.append({**context, "metric": "functional_change",
                                    "value": functional_change(self.originals[site], Wt, self.corpus_keys[site])})
        return record


def triplet_residual(s0: Spectrum, Wt: torch.Tensor, k: int) -> float:
    """max_{i<=k} max(||Wt v_i - s_i u_i||, ||Wt^T u_i - s_i v_i||) / s_i over W0's top-k triplets.

    Zero exactly when every protected original triplet is still a singular triplet of Wt (what
    REVIVE guarantees); unlike the SS diagonal it does not depend on the triplets keeping their
    rank order, which small safe updates can change when the spectrum has no gap at k.
    """
    U, S, V = s0.U[:, :k].double(), s0.S[:k].double(), s0.V[:, :k].double()
    W = Wt.double()
    right = torch.linalg.vector_norm(W @ V - U * S, dim=0)
    left = torch.linalg.vector_norm(W.T @ U - V * S, dim=0)
    return float((torch.maximum(right, left) / S).max())


class EditMetrics:
    """CounterFact metrics on a fixed-size, seeded sample of every record edited so far.

    Round 0 samples the first round's records, so it shows what the edits start from. Evaluating
    all edited records every round would cost O(rounds x records); the sample keeps per-round
    curves affordable (reference evaluation.md, gotcha 19).
    """

    def __init__(self, records: Sequence[dict], batch_size: int, sample: int, seed: int) -> None:
        self.records = list(records)
        self.batch_size = batch_size
        self.sample = sample
        self.seed = seed
        self.plans: dict[int, CounterFactPlan] = {}  # by case_id: every round re-scores the same prompts

    def chosen(self, round: int) -> list[dict]:
        """The records evaluated after ``round`` (the same in every arm)."""
        pool = self.records[: max(1, round) * self.batch_size]
        if len(pool) <= self.sample:
            return pool
        return random.Random(self.seed * 1_000_003 + round).sample(pool, self.sample)

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        records = self.chosen(round)
        for record in records:
            if record["case_id"] not in self.plans:
                self.plans[record["case_id"]] = prepare_counterfact(model.tokenizer, [record])
        rows = counterfact_rows(model.model, CounterFactPlan.concat([self.plans[r["case_id"]] for r in records]))
        values = aggregate(rows)
        context = {"arm": arm.name, "tau": arm.tau, "round": round}
        return RoundRecord(rows=[{**context, "metric": EDIT_METRIC_NAMES[name], "value": value}
                                 for name, value in values.items() if name in EDIT_METRIC_NAMES])


class GeneralAbilityObserver:
    """The general-ability probe after every round: task accuracies and, when there is held-out text, its NLL."""

    def __init__(self, ability: GeneralAbility, text: HeldoutText | None = None) -> None:
        self.ability = ability
        self.text = text

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        scores = self.ability(model.model, model.tokenizer)
        rows = ability_rows(scores, arm=arm.name, tau=arm.tau, round=round)
        if self.text is not None:
            measured = self.text(model.model, model.tokenizer)
            rows += [{"arm": arm.name, "tau": arm.tau, "round": round, "task": "heldout_text", "metric": f"text_{name}",
                      "value": measured[name]} for name in ("nll", "perplexity")]
        return RoundRecord(rows=rows)


class RepresentationShift:
    """Hidden states of held-out factual prompts at the last edited layer: R_k and shift metrics per round.

    The states before editing are taken once (round 0 of the first arm sees the original model);
    a joint t-SNE of the final round against them is added when ``tsne`` is set.
    """

    def __init__(self, prompts: list[tuple[str, str]], layer: int, last_round: int, tsne: bool, seed: int) -> None:
        self.prompts = prompts
        self.layer = layer
        self.last_round = last_round
        self.tsne = tsne
        self.seed = seed
        self.before: torch.Tensor | None = None

    def states(self, model: LoadedModel) -> torch.Tensor:
        return hidden_states(model.model, model.tokenizer, model.adapter, self.prompts, self.layer)

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        now = self.states(model)
        if self.before is None:
            if round != 0:
                raise SpectraError("Representation shift needs the states before editing; resume from round 0.")
            self.before = now
        context = {"arm": arm.name, "tau": arm.tau, "round": round, "site": f"block@{self.layer}"}
        rows = [{**context, "metric": name, "value": value} for name, value in shift_metrics(self.before, now).items()]
        rates = relative_change_rate(self.before, now)
        rows += [{**context, "metric": f"R_k_{name}", "value": float(fn(rates))}
                 for name, fn in (("median", torch.median), ("max", torch.max), ("mean", torch.mean))]
        if self.tsne and round == self.last_round:
            rows += [{**context, **point, "metric": "tsne", "value": float("nan")}
                     for point in joint_tsne(self.before, now, seed=self.seed)]
        return RoundRecord(rows=rows)


def held_out_prompts(records: Sequence[dict], edited: int, count: int) -> list[tuple[str, str]]:
    """(template, subject) prompts of records that are never edited in this run (facts the edits should spare)."""
    spare = records[edited : edited + count]
    return [(r["requested_rewrite"]["prompt"], r["requested_rewrite"]["subject"]) for r in spare]


def editor_defaults(model: LoadedModel, config: DriftConfig) -> tuple[str, Path]:
    """Which per-model hyperparameter defaults apply, and the text corpus for the key statistics.

    A tiny-world model (the embedded one or one retrained elsewhere) uses the ``tiny`` defaults and
    its own training corpus; a real model needs its alias's defaults and ``--stats-corpus``.
    """
    directory = world_dir(model)
    if directory is not None:
        return "tiny", config.stats_corpus or directory / WORLD_FILES["corpus"]
    if config.model not in KNOWN_MODELS:
        raise SpectraError(
            f"spectra has editor defaults for {', '.join(KNOWN_MODELS)} only, not for {config.model!r}. Use one of "
            "those aliases, or build the editor's hyperparameters yourself through the Python API."
        )
    if config.stats_corpus is None:
        raise SpectraError(
            "Editing a real model needs a text corpus for the key statistics E[k k^T]: pass --stats-corpus FILE (one "
            "document per line, e.g. a Wikipedia dump you have locally). spectra never downloads one silently."
        )
    return config.model, config.stats_corpus


#: Edits per round as a share of the model's width: the REVIVE paper's 100 edits a round on Llama-3-8B,
#: whose residual stream is 4,096 wide. A round of that many edits is a rank-100 update; the same
#: share keeps a round of the protocol equally large relative to the space it writes into.
EDITS_PER_WIDTH = 100 / 4096


def default_batch_size(model: LoadedModel) -> int:
    """Edits per round for ``model``: ``EDITS_PER_WIDTH`` of its hidden size (100 on 4,096-wide models, 6 on tiny)."""
    width = model.adapter.shape(Site(0, "mlp.down"))[0]
    return max(1, round(EDITS_PER_WIDTH * width))


def run_drift(config: DriftConfig, progress: bool = True) -> Path:
    """Run (or resume) a drift experiment and write its run directory; returns the run's path."""
    from spectra.editing import make_editor
    from spectra.plots import plot_run

    config.validate()
    arms = config.arms()
    model = open_model(config)
    if config.batch_size is None:
        config.batch_size = default_batch_size(model)
    dataset = default_dataset(model) if config.dataset == "auto" else config.dataset
    needed = config.rounds * config.batch_size
    _, records = resolve_dataset(dataset, model_name=config.model, limit=needed + config.represent_prompts)
    requests = [EditRequest.from_counterfact(r) for r in records[:needed]]

    defaults, corpus = editor_defaults(model, config)
    overrides = {"seed": config.seed}
    if config.placement is not None:
        overrides["revive_placement"] = config.placement

    def new_editor() -> Editor:
        return make_editor(config.editor, defaults, corpus=corpus, progress=progress, **overrides)

    loop_sites = new_editor().edited_sites(model)
    originals = {site: model.adapter.read(site).float().cpu() for site in loop_sites}
    spectra0 = {site: svd(W) for site, W in originals.items()}
    down_sites = [site for site in loop_sites if site.kind == "mlp.down"]
    keys = sample_keys(model, [site.layer for site in down_sites], read_corpus(corpus, FUNCTIONAL_DOCUMENTS))
    corpus_keys = {site: keys[site.layer].cpu() for site in down_sites}

    def make_filter(arm: Arm) -> SiteFilter:
        if arm.tau is None:
            return IdentityFilter()
        return ReviveFilter({s: ReviveProjector(spectra0[s], arm.tau) for s in loop_sites}, arm.tau, config.refresh)

    observers = [
        SpectralDrift(originals, spectra0, config.metric_tau, config.ss_every, config.rounds, corpus_keys),
        EditMetrics(records[:needed], config.batch_size, config.eval_records, config.seed),
        GeneralAbilityObserver(general_ability(model, config.general, config.seed), heldout_text(model, config.general)),
    ]
    held_out = held_out_prompts(records, needed, config.represent_prompts)
    if held_out:
        last_layer = max(site.layer for site in loop_sites)
        observers.append(RepresentationShift(held_out, last_layer, config.rounds, config.tsne, config.seed))
    loop = EditLoop(model, requests, config.rounds, config.batch_size, new_editor, make_filter, observers)

    if config.resume is not None:
        writer, checkpoint = resume_run(config.resume, "drift", config)
        resume = None
        if checkpoint.round is not None:
            position = checkpoint.state["position"]
            arm_index, last_round = int(position["arm"]), int(position["round"])
            resume = resume_point(arm_index, last_round, checkpoint.state, loop_sites)
            if held_out:
                observers[-1].before = checkpoint.state["representations"]["before"]
    else:
        writer, resume = create_run("drift", config, out=config.out), None

    def on_round(arm: Arm, arm_index: int, round: int, record: RoundRecord, state: dict) -> None:
        writer.add_rows({**row, "editor": config.editor} for row in record.rows)
        writer.add_tensors(record.tensors)
        state = {**state, "position": {"arm": torch.tensor(arm_index), "round": torch.tensor(round)}}
        if held_out and observers[-1].before is not None:
            state["representations"] = {"before": observers[-1].before}
        writer.checkpoint(arm_index * (config.rounds + 1) + round, state)
        if progress:
            _print_round(arm, round, record)

    loop.run(arms, on_round, resume)
    path = writer.finalize()
    plot_run(path)
    return path


#: The console line of a round: (label, metric, format); values are means over sites (right side for SS).
CONSOLE_FIELDS = (
    ("efficacy %", "efficacy", "{:.1f}"), ("neighbourhood %", "neighborhood", "{:.1f}"),
    ("tasks acc", "accuracy", "{:.3f}"), ("text NLL", "text_nll", "{:.3f}"), ("LS", "LS", "{:.3f}"),
    ("SS diag min", "SS_protected_diag_min", "{:.4f}"), ("|dW|2/s1", "delta_spectral_rel", "{:.3f}"),
    ("edit s", "seconds_edit", "{:.1f}"),
)


def round_summary(rows: Sequence[dict]) -> dict[str, float]:
    """The console line's numbers for one round's rows: each CONSOLE_FIELDS metric averaged over sites."""
    def given(value: object) -> object:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    values: dict[str, list[float]] = {}
    for row in rows:
        if given(row.get("task")) in (None, "mean", "heldout_text") and given(row.get("side")) in (None, "right"):
            values.setdefault(row["metric"], []).append(row["value"])
    return {label: sum(values[metric]) / len(values[metric]) for label, metric, _ in CONSOLE_FIELDS if values.get(metric)}


def last_round_table(rows: "pd.DataFrame") -> "pd.DataFrame":
    """Per arm, the console line's numbers after the last round, with labelled columns (the final summary)."""
    import pandas as pd

    last = rows[rows["round"] == rows["round"].max()]
    table = {arm: round_summary(group.to_dict("records")) for arm, group in last.groupby("arm", sort=False)}
    return pd.DataFrame.from_dict(table, orient="index").rename_axis(f"arm (round {int(last['round'].max())})")


def _print_round(arm: Arm, round: int, record: RoundRecord) -> None:
    """One console line per round, every number labelled (printed whole, never wrapped)."""
    summary = round_summary(record.rows)
    parts = [f"{label} {fmt.format(summary[label])}" for label, _, fmt in CONSOLE_FIELDS if label in summary]
    print(f"{arm.name:>8} round {round:>3} | " + " | ".join(parts), flush=True)
