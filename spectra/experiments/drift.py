"""``spectra drift``: sequential editing round after round, REVIVE on and off, with spectral and behavioural tracking."""

from __future__ import annotations

import math
import random
import statistics
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

if TYPE_CHECKING:
    import pandas as pd

from spectra.data.datasets import resolve_dataset
from spectra.data.records import EditRequest
from spectra.editing.base import Editor
from spectra.editing.filters import IdentityFilter, ReviveFilter, SiteFilter
from spectra.editing.hparams import MemitHParams
from spectra.editing.hparams_files import ResolvedHParams, resolve_hparams
from spectra.editing.stats_import import ImportedStatistics, StatsFile, locate_statistics
from spectra.editing.loop import Arm, ArmState, EditLoop, Observer, RoundRecord, arm_state
from spectra.errors import SpectraError
from spectra.evaluation.counterfact import CounterFactPlan, counterfact_rows, generation_rows, prepare_counterfact
from spectra.evaluation.general import GeneralAbility, HeldoutText
from spectra.evaluation.representations import hidden_states, joint_tsne, shift_metrics
from spectra.evaluation.rows import aggregate
from spectra.editing.stats import read_corpus, sample_keys
from spectra.experiments.common import (
    LISTED_RECORDS, CommonOptions, GeneralOptions, config_from_json, default_dataset, defaults_key,
    choose_sites, general_ability, general_rows, heldout_text, open_model, usable_records, world_dir,
)
from spectra.experiments.protection import protection_scores
from spectra.models.loading import (
    LoadedModel, check_device_map, check_model_source, load_tokenizer, model_width, resolve_dtype,
)
from spectra.glossary import with_units
from spectra.models.sites import Site
from spectra.models.tiny import WORLD_FILES
from spectra.progress import ConsoleStages
from spectra.results import (
    RESUME_IGNORED, Checkpoint, check_run_target, config_changes, create_run, flatten_options, inspect_run, jsonable,
    load_run, resume_run, ss_key,
)
from spectra.runlock import busy_message, live_writer
from spectra.spectral import (
    Protection, ReviveProjector, Spectrum, drift_stats, functional_change, ls, rank_for_energy, relative_change_rate, ss,
    ss_best_match, ss_diagonal, ss_summary, svd,
)
from spectra.spectral.protect import CRITERIA, SCORED

#: Corpus documents whose keys measure each round's functional change (``functional_change`` rows).
FUNCTIONAL_DOCUMENTS = 400

#: Reference metric names -> the names the paper's figures use.
EDIT_METRIC_NAMES = {
    "rewrite_success": "efficacy", "paraphrase_success": "paraphrase", "neighborhood_success": "neighborhood",
    "rewrite_diff": "efficacy_magnitude", "paraphrase_diff": "paraphrase_magnitude",
    "neighborhood_diff": "neighborhood_magnitude", "rewrite_acc": "efficacy_acc",
    "paraphrase_acc": "paraphrase_acc", "neighborhood_acc": "neighborhood_acc", "score": "score",
    "portability_acc": "portability", "ngram_entropy": "fluency", "reference_score": "consistency",
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
    #: keep one row per scored prompt (samples.csv: arm, round, case_id, prompt kind, P(new), P(true), success)
    log_samples: bool = False
    #: generation entropy of sampled continuations of the scored records' generation prompts, per round
    fluency: bool = False
    #: TF-IDF similarity of those generations to reference texts about the new target, per round
    consistency: bool = False
    stats_corpus: Path | None = None
    #: the editor's hyperparameters: an EasyEdit YAML or official JSON file, or a mapping of field values (a
    #: MemitHParams given here is stored as its mapping); None: the model's defaults
    hparams: Path | dict | None = None
    #: ``key=value`` overrides of single hyperparameters (``--set``), applied after the file
    hparams_set: list[str] = field(default_factory=list)
    #: precomputed key statistics (a MEMIT/ROME layer_stats .npz, spectra cache entries, or a directory of them)
    stats: Path | None = None
    #: which singular triplets of W0 REVIVE protects (spectra.spectral.protect.CRITERIA): energy is the paper's
    protect: str = "energy"
    #: protect exactly this many triplets per site instead of the number tau buys
    protect_dim: int | None = None
    #: the sites whose spectral drift is measured (KIND or KIND@LAYER, comma-separated); None: the sites the editor
    #: writes. A listed site the editor does not write must keep zero drift (a guard that it touches only those)
    sites: str | None = None
    #: edit a seeded shuffle of the dataset's records (a different set of facts per --seed) instead of its first ones
    shuffle_records: bool = False
    general: GeneralOptions = field(default_factory=GeneralOptions)
    skip_bad_records: bool = False
    resume: Path | None = None

    def __post_init__(self) -> None:
        """Hyperparameters given as an object or a path string are kept in their JSON-able form (config.json)."""
        if isinstance(self.hparams, MemitHParams):
            self.hparams = self.hparams.to_dict()
        elif isinstance(self.hparams, str):
            self.hparams = Path(self.hparams)

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
        if self.protect not in CRITERIA:
            raise SpectraError(f"--protect must be one of {', '.join(CRITERIA)}, not {self.protect!r}.")
        if self.protect_dim is not None:
            if self.protect_dim < 1:
                raise SpectraError(f"--protect-dim must be at least 1 (got {self.protect_dim}).")
            if len(self.tau) > 1:
                raise SpectraError("--protect-dim fixes the protected dimension, so several --tau values would run the "
                                   "same REVIVE arm several times: give one --tau, or leave --protect-dim out.")
        if self.refresh == "current" and self.protect in SCORED:
            raise SpectraError(f"--refresh current rebuilds the protected set from the current weights each round, "
                               f"which the {self.protect} criterion cannot (its scores are measured on the original "
                               "model): use --refresh original or another --protect.")
        if self.editor == "nse" and self.placement == "in_solve":
            raise SpectraError("NSE places REVIVE after its neuron-sparse solve only (it has no orthonormal key basis to "
                               "solve on): use --placement after, or leave --placement out.")
        if self.ss_every < 1 or self.eval_records < 1 or self.represent_prompts < 0:
            raise SpectraError(
                f"--ss-every and --eval-records must be at least 1 and --represent-prompts at least 0 (got "
                f"{self.ss_every}, {self.eval_records}, {self.represent_prompts})."
            )
        self.general.validate()

    def protection(self, tau: float) -> Protection:
        """The protection of a REVIVE arm at threshold ``tau``: --protect with --protect-dim or that tau as budget."""
        if self.protect_dim is not None:
            return Protection(self.protect, dim=self.protect_dim)
        return Protection(self.protect, tau=tau)

    def arms(self) -> list[Arm]:
        """The off arm and/or one REVIVE arm per tau, in that order."""
        arms = [Arm("off")] if self.revive in ("off", "both") else []
        if self.revive in ("on", "both"):
            single = len(self.tau) == 1
            arms += [Arm("revive" if single else f"revive@{tau:g}", tau) for tau in self.tau]
        return arms


EDITOR_NAMES = ("memit", "alphaedit", "rect", "prune", "nse")


class SpectralDrift:
    """LS, SS (both sides) with its summaries, and norm growth of every measured site against the original.

    ``protected(arm)`` maps each site an arm's REVIVE filter protects to the indices of its protected
    triplets of W0 (nothing in the off arm). The protected-subspace metrics are taken over those
    triplets, and over the top-k at ``tau`` at a site nothing protects; ``protected_dim`` records
    how many triplets are protected (0 there).
    """

    def __init__(self, originals: dict[Site, torch.Tensor], spectra0: dict[Site, Spectrum], tau: float,
                 ss_every: int, last_round: int, corpus_keys: dict[Site, torch.Tensor] | None = None,
                 protected: Callable[[Arm], Mapping[Site, torch.Tensor]] | None = None) -> None:
        self.originals = originals
        self.spectra0 = spectra0
        self.tau = tau
        self.ss_every = ss_every
        self.last_round = last_round
        self.corpus_keys = corpus_keys or {}
        self.protected = protected or (lambda arm: {})

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        record = RoundRecord()
        keep_matrices = round % self.ss_every == 0 or round == self.last_round
        protected = self.protected(arm)
        for site, s0 in self.spectra0.items():
            Wt = model.adapter.read(site).float().cpu()
            st = svd(Wt)
            context = {"arm": arm.name, "tau": arm.tau, "round": round, "site": str(site)}
            record.rows.append({**context, "metric": "LS", "value": ls(s0, st, self.tau)})
            k = rank_for_energy(s0.S, self.tau)
            if round == 0:
                record.rows.append({**context, "metric": "sigma_k_rel", "value": float(s0.S[k - 1] / s0.S[0])})
            guarded = protected[site] if site in protected else torch.arange(k)
            record.rows.append({**context, "metric": "protected_dim", "value": float(protected[site].numel())
                                if site in protected else 0.0})
            for side in ("right", "left"):
                matrix = ss(s0, st, k=k, side=side)
                for name, value in ss_summary(matrix).items():
                    record.rows.append({**context, "side": side, "metric": f"SS_{name}", "value": value})
                record.rows.append({**context, "side": side, "metric": "SS_protected_diag_min",
                                    "value": float(ss_diagonal(s0, st, guarded, side).min())})
                record.rows.append({**context, "side": side, "metric": "SS_protected_match_min",
                                    "value": ss_best_match(s0, st, guarded, side)})
                if keep_matrices:
                    record.tensors[ss_key(side, arm.name, round, str(site))] = matrix.float()
            record.rows.append({**context, "metric": "protected_triplet_residual",
                                "value": triplet_residual(s0, Wt, guarded)})
            stats = drift_stats(self.originals[site], Wt, spectrum0=s0, spectrum_t=st)
            for name in ("fro_ratio", "delta_fro", "delta_fro_rel", "delta_spectral_rel", "spectral_norm_ratio",
                         "spectral_norm_t", "condition_number_t", "effective_rank_t"):
                record.rows.append({**context, "metric": name.removesuffix("_t"), "value": stats[name]})
            if site in self.corpus_keys:
                record.rows.append({**context, "metric": "functional_change",
                                    "value": functional_change(self.originals[site], Wt, self.corpus_keys[site])})
        return record


def triplet_residual(s0: Spectrum, Wt: torch.Tensor, indices: torch.Tensor) -> float:
    """max_i max(||Wt v_i - s_i u_i||, ||Wt^T u_i - s_i v_i||) / s_i over W0's triplets at ``indices``.

    Zero exactly when every protected original triplet is still a singular triplet of Wt (what
    REVIVE guarantees); unlike the SS diagonal it does not depend on the triplets keeping their
    rank order, which small safe updates can change when the spectrum has no gap at k.
    """
    idx = indices.to(s0.U.device)
    U, S, V = s0.U[:, idx].double(), s0.S[idx].double(), s0.V[:, idx].double()
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

    #: the prompt kinds scored (None: every kind a record has)
    kinds: tuple[str, ...] | None = None

    def __init__(self, records: Sequence[dict], batch_size: int, sample: int, seed: int, log_samples: bool = False) -> None:
        self.records = list(records)
        self.batch_size = batch_size
        self.sample = sample
        self.seed = seed
        self.log_samples = log_samples
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
        plan = CounterFactPlan.concat([self.plans[r["case_id"]] for r in records])
        rows = counterfact_rows(model.model, plan if self.kinds is None else plan.restricted(self.kinds))
        values = aggregate(rows)
        context = {"arm": arm.name, "tau": arm.tau, "round": round}
        return RoundRecord(rows=[{**context, "metric": EDIT_METRIC_NAMES[name], "value": value}
                                 for name, value in values.items() if name in EDIT_METRIC_NAMES],
                           samples=[{**context, **sample} for sample in prompt_samples(rows)] if self.log_samples else [])


def prompt_samples(rows: Sequence[dict]) -> list[dict]:
    """One sample per scored prompt: case_id, prompt_kind, prompt_idx, p_new, p_true, success.

    P(x) is exp(-mean NLL of x's tokens), the per-token probability the metrics compare; success
    is 1/0 whether the expected target won (a portability prompt: its answer's token accuracy),
    so the mean of success per record, then over records, times 100, is the run's edit metric.
    """
    samples: dict[tuple[int, str, int], dict] = {}
    for row in rows:
        key = (row["case_id"], row["prompt_kind"], row["prompt_idx"])
        sample = samples.setdefault(key, {"case_id": key[0], "prompt_kind": key[1], "prompt_idx": key[2],
                                          "p_new": math.nan, "p_true": math.nan, "success": math.nan})
        measure = row["metric"].removeprefix(f"{row['prompt_kind']}_")
        if measure in ("nll_new", "nll_true"):
            sample["p_" + measure.removeprefix("nll_")] = math.exp(-row["value"])
        elif measure == "success" or (measure == "acc" and row["prompt_kind"] == "portability"):
            sample["success"] = row["value"]
    return list(samples.values())


class GenerationMetrics:
    """Fluency and/or consistency of sampled generations from the records EditMetrics scores this round.

    Each generation prompt of each record gets one 100-token top-5 sample (the reference's
    ``generate_fast``); a record without generation prompts uses its edited prompt. The sampler is
    seeded by round alone, so the arms differ only by their weights and a resumed round repeats.
    """

    def __init__(self, metrics: EditMetrics, fluency: bool, references: Mapping[tuple[str, str], Sequence[str]] | None,
                 vectorizer: object | None) -> None:
        self.metrics = metrics
        self.fluency = fluency
        self.references = references
        self.vectorizer = vectorizer

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        records = [record if record.get("generation_prompts") else
                   {**record, "generation_prompts": [record["requested_rewrite"]["prompt"].format(
                       record["requested_rewrite"]["subject"])]} for record in self.metrics.chosen(round)]
        generator = torch.Generator().manual_seed(self.metrics.seed * 1_000_003 + round)
        rows = generation_rows(model.model, model.tokenizer, records, generator, references=self.references,
                               vectorizer=self.vectorizer)
        wanted = ({"ngram_entropy"} if self.fluency else set()) | ({"reference_score"} if self.references else set())
        values = aggregate([row for row in rows if row["metric"] in wanted])
        context = {"arm": arm.name, "tau": arm.tau, "round": round}
        return RoundRecord(rows=[{**context, "metric": EDIT_METRIC_NAMES[name], "value": value}
                                 for name, value in values.items() if name in wanted])


def consistency_references(model: str, records: Sequence[dict]) -> tuple[dict, object]:
    """Reference texts by (relation_id, target id) and the TF-IDF vectorizer that --consistency compares with.

    A tiny-world model brings its attribute snippets (the vectorizer is fitted on them, as the
    reference's IDF files were); a real model needs attribute_snippets.json, idf.npy and
    tfidf_vocab.json in the data directory. Records must name their relation and target ids.
    """
    from spectra.data.counterfact import load_attribute_snippets, load_tfidf_stats
    from spectra.data.datasets import data_dir
    from spectra.evaluation.consistency import fit_tfidf, tfidf_vectorizer

    rewrite = records[0]["requested_rewrite"] if records else {}
    if not (rewrite.get("relation_id") and (rewrite.get("target_new") or {}).get("id")):
        raise SpectraError(
            "--consistency compares generations with reference texts about the new target, found by the records' "
            "relation_id and target_new.id, which this dataset's records lack (CounterFact and MultiCounterFact have "
            "them). Leave out --consistency for this dataset."
        )
    directory = world_dir(model)
    if directory is not None:
        references = load_attribute_snippets(directory / WORLD_FILES["snippets"])
        return references, fit_tfidf([text for texts in references.values() for text in texts])
    folder = data_dir()
    references = load_attribute_snippets(folder / "attribute_snippets.json")
    return references, tfidf_vectorizer(*load_tfidf_stats(folder / "idf.npy", folder / "tfidf_vocab.json"))


class GeneralAbilityObserver:
    """The general-ability probe after every round: task accuracies and, when there is held-out text, its NLL."""

    def __init__(self, ability: GeneralAbility, text: HeldoutText | None = None) -> None:
        self.ability = ability
        self.text = text

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        return RoundRecord(rows=general_rows(self.ability, self.text, model, arm=arm.name, tau=arm.tau, round=round))


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


def held_out_prompts(records: Sequence[dict], count: int) -> list[tuple[str, str]]:
    """(template, subject) prompts of the last ``count`` records, which a run never edits (facts the edits should spare).

    Taken from the end so that they stay the same when a run is extended with more rounds.
    """
    spare = records[len(records) - count:] if count else []
    return [(r["requested_rewrite"]["prompt"], r["requested_rewrite"]["subject"]) for r in spare]


def editor_defaults(model: LoadedModel | str, config: DriftConfig) -> tuple[str | None, Path | None]:
    """Which per-model hyperparameter defaults apply (None: none), and the text corpus for the key statistics.

    A tiny-world model (the embedded one or one retrained elsewhere) uses the ``tiny`` defaults and
    its own training corpus; a known model (by alias, hub id or the directory an alias resolves to)
    its alias's defaults; any model needs ``--stats-corpus`` or precomputed ``--stats``.
    """
    directory = world_dir(model)
    name = model.name if isinstance(model, LoadedModel) else config.model
    defaults = "tiny" if directory is not None else defaults_key(name)
    corpus = config.stats_corpus or (directory / WORLD_FILES["corpus"] if directory is not None else None)
    if corpus is None and config.stats is None:
        raise SpectraError(
            "Editing a real model needs its key statistics E[k k^T]: pass --stats FILE_OR_DIR with precomputed ones (the "
            "MEMIT/ROME layer_stats .npz files) or --stats-corpus FILE (one document per line, e.g. a Wikipedia dump "
            "you have locally) to compute them. spectra never downloads one silently."
        )
    if corpus is not None and not Path(corpus).is_file():
        raise SpectraError(f"The statistics corpus {corpus} does not exist; give --stats-corpus a text file, one "
                           "document per line.")
    return defaults, None if corpus is None else Path(corpus)


def drift_hparams(config: DriftConfig, defaults: str | None) -> ResolvedHParams:
    """The editor's hyperparameters: the model's defaults, then ``--hparams``, then ``--set``, then seed and placement."""
    from spectra.editing import builtin_registry

    overrides: dict[str, object] = {"seed": config.seed}
    if config.placement is not None:
        overrides["revive_placement"] = config.placement
    cls = builtin_registry().resolve(config.editor).hparams_class
    return resolve_hparams(cls, config.editor, config.model, defaults, config.hparams, config.hparams_set, overrides)


#: Edits per round as a share of the model's width: the REVIVE paper's 100 edits a round on Llama-3-8B,
#: whose residual stream is 4,096 wide. A round of that many edits is a rank-100 update; the same
#: share keeps a round of the protocol equally large relative to the space it writes into.
EDITS_PER_WIDTH = 100 / 4096


def default_batch_size(width: int) -> int:
    """Edits per round for a model ``width`` wide: ``EDITS_PER_WIDTH`` of it (100 on 4,096-wide models, 5 on the
    192-wide tiny model)."""
    return max(1, round(EDITS_PER_WIDTH * width))


#: Options whose command-line name is not the field name with dashes.
OPTION_NAMES = {"general.tasks": "--tasks", "general.items_per_task": "--items-per-task", "general.data_dir": "--glue-dir",
                "hparams_set": "--set"}


def option_name(key: str) -> str:
    """The command-line option of a (dotted) config key."""
    return OPTION_NAMES.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


def resumed_config(config: DriftConfig, given: Collection[str] | None = None, command: str = "drift") -> DriftConfig:
    """The options a resumed run of ``command`` uses: the run's own from its config.json, the ``given`` ones checked
    against them.

    ``given`` names the (dotted) options the caller set explicitly; None means those that differ
    from the config class's defaults. They must equal the run's own, except ``rounds``, which may
    grow to extend the run. Read before the model loads, so a wrong option costs nothing.
    """
    found = inspect_run(config.resume)
    if live_writer(found.directory) is not None:
        raise SpectraError(busy_message(found.directory))
    if found.command != command:
        raise SpectraError(f"{found.directory} is a '{found.command}' run, not a {command} run; resume it with "
                           f"`spectra {found.command}`, or start a new {command} run without --resume.")
    new = flatten_options(jsonable(config))
    if given is None:
        defaults = flatten_options(jsonable(type(config)()))
        given = {key for key, value in new.items() if defaults.get(key) != value}
    changes = config_changes(found.config, jsonable(config), RESUME_IGNORED | {"rounds"}, keys=given)
    if changes:
        named = "; ".join(f"{option_name(change.split(':', 1)[0])}{change[change.index(':'):]}" for change in changes)
        raise SpectraError(
            f"Cannot resume {found.path}: options given differ from the run's own (run's -> given: {named}). Leave them "
            "out (a bare --resume DIR takes every option from the run's config.json; only --rounds may be larger, to "
            "extend the run), or start a new run without --resume."
        )
    options = dict(found.config)
    options["resume"] = str(config.resume)
    if "rounds" in given:
        options["rounds"] = config.rounds
        if options["editor"] == "nse" and config.rounds > found.config.get("rounds", config.rounds):
            raise SpectraError(
                f"Cannot extend {found.path}: NSE computes every request's target on the unedited model before round 1, "
                "and a finished NSE run no longer has that model. Start a new run with the number of rounds you need."
            )
    return config_from_json(type(config), options)


@dataclass
class DriftInputs:
    """Everything a drift run reads before its model loads, each checked: the records, probes, corpus and defaults."""

    records: list[dict]
    skipped: list[int]
    ability: GeneralAbility
    text: HeldoutText | None
    hparams: ResolvedHParams
    corpus: Path | None
    statistics: dict[int, StatsFile] | None
    tokenizer: object
    #: --consistency's reference texts and TF-IDF vectorizer (None without --consistency)
    references: tuple[dict, object] | None = None

    @property
    def provenance(self) -> dict[str, object]:
        """What config.json records about the inputs beyond the options: the resolved hyperparameters, imported
        statistics, and records left out by --skip-bad-records."""
        found: dict[str, object] = {"hparams": self.hparams.provenance()}
        if self.statistics is not None:
            found["statistics"] = {str(layer): stats.provenance() for layer, stats in self.statistics.items()}
        if self.skipped:
            found["skipped_records"] = {"count": len(self.skipped), "case_ids": self.skipped}
        return found


def drift_inputs(config: DriftConfig) -> DriftInputs:
    """Read and check every input of a drift run, cheapest first, before the model's weights load.

    Resolves ``config.batch_size`` from the model's width (config.json records the value used).
    """
    check_model_source(config.model)
    check_device_map(config.device_map)
    resolve_dtype(config.dtype)
    defaults, corpus = editor_defaults(config.model, config)
    hparams = drift_hparams(config, defaults)
    statistics = None
    if config.stats is not None:
        statistics = locate_statistics(config.stats, hparams.hparams.layers, hparams.hparams.mom2_n_samples)
    ability = general_ability(config.model, config.general, config.seed)
    text = heldout_text(config.model, config.general)
    if config.batch_size is None:
        config.batch_size = default_batch_size(model_width(config.model, config.allow_download))
    dataset = default_dataset(config.model) if config.dataset == "auto" else config.dataset
    _, records = resolve_dataset(dataset, model_name=config.model)
    untrue = [r["case_id"] for r in records if not (r["requested_rewrite"].get("target_true") or {}).get("str")]
    if untrue:
        raise SpectraError(
            f"{len(untrue)} records of {dataset} (case ids {', '.join(map(str, untrue[:LISTED_RECORDS]))}"
            f"{', ...' if len(untrue) > LISTED_RECORDS else ''}) have no true target (CounterFact's target_true, "
            "EasyEdit's ground_truth), which drift's metrics compare the new target against. Use a CounterFact or "
            "EasyEdit/KnowEdit file whose records have one (raw zsRE's gold answer is the edit target itself)."
        )
    if config.shuffle_records:
        records = list(records)
        random.Random(config.seed).shuffle(records)
    needed, spare = config.rounds * config.batch_size, config.represent_prompts

    def check_count(available: int, skipped: int) -> None:
        if needed + spare > available:
            left_out = f" once the {skipped} bad ones are left out" if skipped else ""
            raise SpectraError(
                f"{config.rounds} rounds of {config.batch_size} edits and {spare} held-out prompts need "
                f"{needed + spare} records, but {dataset} has {available}{left_out}. Use fewer --rounds, a smaller "
                "--batch-size or fewer --represent-prompts, or a larger dataset."
            )

    skipped: list[int] = []
    if not config.skip_bad_records:
        check_count(len(records), 0)
    tokenizer = load_tokenizer(config.model, config.allow_download)
    if config.skip_bad_records:
        records, skipped = usable_records(records, tokenizer, dataset, skip=True)
        check_count(len(records), len(skipped))
    else:
        usable_records(records[:needed] + records[len(records) - spare:] if spare else records[:needed],
                       tokenizer, dataset, skip=False)
    references = consistency_references(config.model, records) if config.consistency else None
    return DriftInputs(records, skipped, ability, text, hparams, corpus, statistics, tokenizer, references)


@dataclass
class EditSetup:
    """An edit experiment with its model open, before any edit: what its observers are built from."""

    config: DriftConfig
    inputs: DriftInputs
    model: LoadedModel
    #: the records edited, in order (rounds x batch size of them)
    records: list[dict]
    #: the sites the editor writes, and the sites measured (--sites; default: the written ones)
    edited: list[Site]
    measured: list[Site]
    #: float32 CPU original weights and their spectra, for every written and measured site
    originals: dict[Site, torch.Tensor]
    spectra0: dict[Site, Spectrum]
    #: an arm's REVIVE projectors per written site (none for the off arm), built once per arm
    projectors: Callable[[Arm], dict[Site, ReviveProjector]]
    #: state the checkpoint already holds beyond the arms' (drift: the representations before editing)
    saved: dict[str, dict[str, torch.Tensor]]

    def protected(self, arm: Arm) -> dict[Site, torch.Tensor]:
        """The indices of the triplets the arm's filter protects, per written site."""
        return {site: projector.indices for site, projector in self.projectors(arm).items()}


class EditExperiment(Protocol):
    """What sets one experiment on the edit loop apart from another (drift, capacity): its observers and its end."""

    command: str

    def observers(self, setup: EditSetup) -> list[Observer]:
        """The observers measuring every round."""

    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """State to add to the next checkpoint beyond the arms' (taken once); {} when there is none."""

    def finished(self, arm: Arm, round: int, record: RoundRecord) -> bool:
        """Whether the arm ends after this round before its last (it may add rows to ``record`` first)."""


class DriftObservers:
    """``spectra drift``: spectral drift, edit metrics, general ability, generations and representation shift."""

    command = "drift"

    def __init__(self) -> None:
        self.shift: RepresentationShift | None = None
        self.before_saved = False

    def observers(self, setup: EditSetup) -> list[Observer]:
        config, inputs, model = setup.config, setup.inputs, setup.model
        corpus_keys = {}
        if inputs.corpus is not None:  # imported statistics come without their corpus: no functional_change rows
            down_sites = [site for site in setup.measured if site.kind == "mlp.down"]
            keys = sample_keys(model, [s.layer for s in down_sites], read_corpus(inputs.corpus, FUNCTIONAL_DOCUMENTS))
            corpus_keys = {site: keys[site.layer].cpu() for site in down_sites}
        measured = {site: setup.spectra0[site] for site in setup.measured}
        edit_metrics = EditMetrics(setup.records, config.batch_size, config.eval_records, config.seed, config.log_samples)
        observers: list[Observer] = [
            SpectralDrift(setup.originals, measured, config.metric_tau, config.ss_every, config.rounds, corpus_keys,
                          setup.protected),
            edit_metrics,
            GeneralAbilityObserver(inputs.ability, inputs.text),
        ]
        if config.fluency or config.consistency:
            references, vectorizer = inputs.references or (None, None)
            observers.append(GenerationMetrics(edit_metrics, config.fluency, references, vectorizer))
        held_out = held_out_prompts(inputs.records, config.represent_prompts)
        if held_out:
            self.shift = RepresentationShift(held_out, max(site.layer for site in setup.edited), config.rounds,
                                             config.tsne, config.seed)
            self.shift.before = setup.saved.get("representations", {}).get("before")
            self.before_saved = "representations" in setup.saved
            observers.append(self.shift)
        return observers

    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.shift is None or self.shift.before is None or self.before_saved:
            return {}
        self.before_saved = True
        return {"representations": {"before": self.shift.before}}  # taken once; later checkpoints keep its file

    def finished(self, arm: Arm, round: int, record: RoundRecord) -> bool:
        return False


def run_drift(config: DriftConfig, progress: bool = True, given: Collection[str] | None = None,
              figures: bool = True) -> Path:
    """Run, resume or extend a drift experiment and write its run directory; returns the run's path.

    Every cheap check (options, files, dataset, tokenizer, the run directory and its lock) comes
    before the model loads. With ``config.resume`` the run's own options apply (see
    ``resumed_config``; ``given`` names the options the caller set). SIGTERM/SIGINT stop the run
    between checkpoints with a message saying how to resume (``RunInterrupted``). ``figures=False`` leaves the
    figures undrawn (a batch of runs that draws its own; ``spectra plot`` draws them later).
    """
    return run_edits(config, DriftObservers(), progress, given, figures)


def run_edits(config: DriftConfig, experiment: EditExperiment, progress: bool = True,
              given: Collection[str] | None = None, figures: bool = True) -> Path:
    """The edit loop of any edit experiment (``experiment.command``): checks, run directory, arms, checkpoints, figures."""
    from spectra.editing import make_editor
    from spectra.plots import plot_run

    command = experiment.command
    if config.resume is not None:
        config = resumed_config(config, given, command)
    config.validate()
    arms = config.arms()
    if config.resume is None:
        check_run_target(config.out)
    inputs = drift_inputs(config)
    if config.skip_bad_records and inputs.skipped:
        print(f"Skipped {len(inputs.skipped)} records the model cannot represent (--skip-bad-records; case ids in "
              "config.json).", file=sys.stderr)
    if inputs.hparams.ignored_note() and progress:
        print(inputs.hparams.ignored_note(), file=sys.stderr)
    if config.resume is not None:
        check_same_hparams(config.resume, inputs.hparams)
        writer, checkpoint = resume_run(config.resume, command, config, extendable=frozenset({"rounds"}))
        if checkpoint.note:
            print(checkpoint.note, file=sys.stderr)
    else:
        writer = create_run(command, config, out=config.out, provenance=inputs.provenance)
        checkpoint = Checkpoint(round=None, rows=writer.rows, tensors={}, state={})

    with writer.running():
        model = open_model(config, inputs.tokenizer)
        needed = config.rounds * config.batch_size
        requests = [EditRequest.from_counterfact(r) for r in inputs.records[:needed]]
        imported = ImportedStatistics(inputs.statistics) if inputs.statistics is not None else None

        def new_editor() -> Editor:
            return make_editor(config.editor, hparams=inputs.hparams.hparams, corpus=inputs.corpus, statistics=imported,
                               progress=progress)

        probe = new_editor()
        edited = probe.edited_sites(model)
        measured = choose_sites(model, config.sites) if config.sites else edited
        originals = {site: model.adapter.read(site).float().cpu() for site in dict.fromkeys([*edited, *measured])}
        spectra0 = {site: svd(W) for site, W in originals.items()}
        scores = {}
        if any(arm.tau is not None for arm in arms):  # on the unedited model: a resumed arm's weights load later
            scores = protection_scores(config.protect, model, {s: spectra0[s] for s in edited}, probe.statistics,
                                       config.general, config.seed)
        built: dict[str, dict[Site, ReviveProjector]] = {}

        def projectors(arm: Arm) -> dict[Site, ReviveProjector]:
            if arm.tau is None:
                return {}
            if arm.name not in built:
                protection = config.protection(arm.tau)
                built[arm.name] = {site: protection.projector(spectra0[site], scores.get(site)) for site in edited}
            return built[arm.name]

        def make_filter(arm: Arm) -> SiteFilter:
            if arm.tau is None:
                return IdentityFilter()
            return ReviveFilter(projectors(arm), arm.tau, config.refresh, config.protection(arm.tau))

        setup = EditSetup(config, inputs, model, inputs.records[:needed], edited, measured, originals, spectra0,
                          projectors, checkpoint.state)
        loop = EditLoop(model, requests, config.rounds, config.batch_size, new_editor, make_filter,
                        experiment.observers(setup), ConsoleStages(enabled=None if progress else False))
        positions: dict[str, int] = {name: int(r) for name, r in checkpoint.meta.get("arms", {}).items()}
        done: set[str] = set(checkpoint.meta.get("finished", []))
        resume = arm_states(checkpoint, arms, positions, edited)

        def on_round(arm: Arm, arm_index: int, round: int, record: RoundRecord, state: dict) -> None:
            if experiment.finished(arm, round, record):
                done.add(arm.name)
            writer.add_rows(with_units({**row, "editor": config.editor} for row in record.rows))
            writer.add_tensors(record.tensors)
            writer.add_table_rows("samples", record.samples)
            positions[arm.name] = round
            saved = {f"arm{arm_index}": state, **experiment.extra_state()}
            writer.checkpoint(arm_index * (config.rounds + 1) + round, saved,
                              meta={"arms": positions, "finished": sorted(done)},
                              progress=f"round {round} of arm '{arm.name}' (arm {arm_index + 1} of {len(arms)})")
            if progress:
                _print_round(arm, round, record)

        loop.run(arms, on_round, resume, finished=lambda arm: arm.name in done)
        path = writer.finalize(keep_state=True)
    changed = unclaimed_changes(load_run(path).rows, edited)
    if changed:
        print(f"warning: the {config.editor} editor changed sites it does not claim to write ({', '.join(changed)}): "
              "their delta_fro is not zero. Its restore between arms misses them, so later arms started from an "
              "edited model.", file=sys.stderr)
    if figures:
        plot_run(path)
    return path


def unclaimed_changes(rows: "pd.DataFrame", edited: Sequence[Site]) -> list[str]:
    """The measured sites outside ``edited`` whose weights changed in any round (delta_fro > 0): what an editor
    touched without claiming it."""
    if "site" not in rows.columns:
        return []
    deltas = rows[(rows["metric"] == "delta_fro") & ~rows["site"].isin([str(s) for s in edited])]
    return sorted(deltas.loc[deltas["value"] > 0, "site"].unique())


def check_same_hparams(run: Path, hparams: ResolvedHParams) -> None:
    """A resumed run must edit with the hyperparameters it started with (a changed --hparams file would mix two)."""
    stored = inspect_run(run).provenance.get("hparams", {}).get("values")
    now = jsonable(hparams.hparams.to_dict())
    if stored is not None and stored != now:
        changed = sorted(key for key in set(stored) | set(now) if stored.get(key) != now.get(key))
        raise SpectraError(
            f"Cannot resume {run}: its editor hyperparameters differ from those it started with ({', '.join(changed)}); "
            "the --hparams file was probably changed. Restore it (config.json records the values used) or start a "
            "new run."
        )


def arm_states(checkpoint: Checkpoint, arms: Sequence[Arm], positions: dict[str, int],
               sites: Sequence[Site]) -> dict[str, ArmState]:
    """Each started arm's state from a checkpoint (state ``arm<i>``, its last round in ``positions``)."""
    states = {}
    for index, arm in enumerate(arms):
        if arm.name not in positions:
            continue
        tensors = checkpoint.state.get(f"arm{index}")
        if tensors is None:
            raise SpectraError(f"The checkpoint records arm '{arm.name}' at round {positions[arm.name]} but holds no "
                               "state for it; it cannot be resumed. Start the run afresh.")
        states[arm.name] = arm_state(positions[arm.name], tensors, sites)
    return states


#: The console line of a round: (label, metric, format, reduction over sites); for SS the right side.
CONSOLE_FIELDS = (
    ("round efficacy %", "round_efficacy", "{:.1f}", "mean"), ("efficacy %", "efficacy", "{:.1f}", "mean"),
    ("neighbourhood %", "neighborhood", "{:.1f}", "mean"), ("free dim", "remaining_dim", "{:.1f}", "mean"),
    ("tasks acc", "accuracy", "{:.3f}", "mean"), ("text NLL", "text_nll", "{:.3f}", "mean"),
    ("LS", "LS", "{:.3f}", "mean"), ("SS diag min", "SS_protected_diag_min", "{:.4f}", "mean"),
    ("protected resid max", "protected_triplet_residual", "{:.1e}", "max"),
    ("|dW|2/s1 max", "delta_spectral_rel", "{:.3f}", "max"), ("edit s", "seconds_edit", "{:.1f}", "mean"),
)
REDUCTIONS: dict[str, Callable[[list[float]], float]] = {"mean": statistics.fmean, "max": max}


def is_missing(value: object) -> bool:
    """True for an empty cell: None, or the NaN a table holds where a row has no such column."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def round_summary(rows: Sequence[dict]) -> dict[str, float]:
    """The console line's numbers for one round's rows: each CONSOLE_FIELDS metric reduced over sites."""
    values: dict[str, list[float]] = {}
    for row in rows:
        task, side = row.get("task"), row.get("side")
        if (is_missing(task) or task in ("mean", "heldout_text")) and (is_missing(side) or side == "right"):
            values.setdefault(row["metric"], []).append(row["value"])
    return {label: REDUCTIONS[reduce](values[metric]) for label, metric, _, reduce in CONSOLE_FIELDS
            if values.get(metric)}


def regime_note(rows: "pd.DataFrame") -> str | None:
    """A warning when an arm's update passed sigma_k(W_0) at a site by the last round, or None.

    Past that point LS and the rank-ordered SS diagonal fall towards 0 whether or not W_0's dominant
    triplets survived (README, "When LS and the rank-ordered SS stop being informative"), so a reader
    comparing arms by them would be misled; the protected-triplet residual still tells.
    """
    if "site" not in rows.columns:
        return None
    first = rows[(rows["metric"] == "sigma_k_rel") & (rows["round"] == 0)].groupby("site")["value"].min()
    last = rows[(rows["metric"] == "delta_spectral_rel") & (rows["round"] == rows["round"].max())]
    if first.empty or last.empty:
        return None
    last = last.assign(limit=last["site"].map(first)).dropna(subset=["limit"])
    past = last[last["value"] >= last["limit"]]
    if past.empty:
        return None
    arms = ", ".join(dict.fromkeys(past["arm"]))
    return (f"note: in arm(s) {arms} the update's spectral norm has passed sigma_k(W_0) at {past['site'].nunique()} "
            f"of {last['site'].nunique()} site(s) (|dW|2/s1 up to {past['value'].max():.3g}, against sigma_k/sigma_1 "
            f"{past['limit'].min():.2f}-{past['limit'].max():.2f}). There LS and the SS diagonal fall towards 0 whether "
            "or not W_0's dominant triplets survived, so they no longer compare the arms; 'protected resid max' does "
            "(0 when REVIVE kept them; metric protected_triplet_residual). See the README, \"When LS and the "
            "rank-ordered SS stop being informative\".")


def last_round_table(rows: "pd.DataFrame") -> "pd.DataFrame":
    """Per arm, the console line's numbers after the last round, with labelled columns (the final summary)."""
    import pandas as pd

    last = rows[rows["round"] == rows["round"].max()]
    table = {arm: round_summary(group.to_dict("records")) for arm, group in last.groupby("arm", sort=False)}
    return pd.DataFrame.from_dict(table, orient="index").rename_axis(f"arm (round {int(last['round'].max())})")


def formatted_table(table: "pd.DataFrame") -> "pd.DataFrame":
    """``last_round_table`` with each number written as its console line writes it (for reading, not for CSV/JSON)."""
    formats = {label: fmt for label, _, fmt, _ in CONSOLE_FIELDS}
    return table.apply(lambda column: column.map(lambda value: formats[column.name].format(value)
                                                 if not is_missing(value) else ""))


def _print_round(arm: Arm, round: int, record: RoundRecord) -> None:
    """One console line per round, every number labelled (printed whole, never wrapped)."""
    summary = round_summary(record.rows)
    parts = [f"{label} {fmt.format(summary[label])}" for label, _, fmt, _ in CONSOLE_FIELDS if label in summary]
    print(f"{arm.name:>8} round {round:>3} | " + " | ".join(parts), flush=True)
