"""Every metric name a run's results.csv can hold: its unit (scale), definition and source, in one place.

Rows carry their metric's unit in a ``unit`` column (added by ``with_units``), so a table never
mixes a 0-100 efficacy with a 0-1 accuracy silently. The README's glossary is this table
(``glossary_markdown``); a test keeps the two, and the metrics of a default drift run, in step.

Units: ``percent`` (0-100), ``fraction`` (0-1), ``correlation`` (-1 to 1), ``ratio`` (>= 0,
1 = unchanged), ``weight norm`` (in the weights' own units), ``count``, ``nats/token``,
``seconds``, ``bits x 100`` (the papers' fluency), ``coordinate`` (t-SNE).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """One metric name: the unit its values are in, what it measures, and where the definition comes from."""

    unit: str
    definition: str
    source: str


_CF = "ROME/MEMIT `eval_utils_counterfact.py`, AlphaEdit `summarize.py` (mean per record, then over records, x100)"
_SS = ("SS = k x r matrix of |cos(v_i(W_t), v_j(W_0))|, rows: the top-`metric_tau` vectors of W_t (right side: input "
       "vectors; left: output vectors)")
_SHIFT = "held-out prompts' hidden states at the last edited layer, before editing (x) and now (y)"

GLOSSARY: dict[str, Metric] = {
    # -- edit success (drift; CounterFact-style scoring of records edited so far) ----------------
    "efficacy": Metric("percent", "Share of edited prompts where P(target_new) > P(target_true) (per-token mean "
                       "probability).", f"REVIVE Eq. 10; {_CF}"),
    "paraphrase": Metric("percent", "The same comparison on the records' paraphrase prompts.", f"REVIVE Eq. 11; {_CF}"),
    "neighborhood": Metric("percent", "Share of neighbourhood (locality) prompts where the true answer still beats "
                           "target_new.", f"REVIVE Eq. 12; {_CF}"),
    "score": Metric("percent", "Harmonic mean of efficacy, paraphrase and neighborhood.", "MEMIT `summarize.py`"),
    "efficacy_magnitude": Metric("percent", "Mean of P(target_new) - P(target_true) on the edited prompts (x100: "
                                 "percentage points).", _CF),
    "paraphrase_magnitude": Metric("percent", "The same difference on paraphrase prompts.", _CF),
    "neighborhood_magnitude": Metric("percent", "Mean of P(true answer) - P(target_new) on neighbourhood prompts.", _CF),
    "efficacy_acc": Metric("percent", "Share of edited prompts whose every target_new token is the argmax.",
                           "AlphaEdit `rewrite_prompts_correct`"),
    "paraphrase_acc": Metric("percent", "The same on paraphrase prompts.", "AlphaEdit `paraphrase_prompts_correct`"),
    "neighborhood_acc": Metric("percent", "Share of neighbourhood prompts whose every true-answer token is the argmax.",
                               "AlphaEdit `neighborhood_prompts_correct`"),
    "portability": Metric("percent", "Mean share of a portability answer's tokens that are the argmax (teacher "
                          "forced); only for datasets with portability prompts (KnowEdit, EasyEdit).",
                          "EasyEdit `test_prediction_acc` (KnowEdit's portability)"),
    "fluency": Metric("bits x 100", "Generation entropy of 100-token top-5 samples from the records' generation "
                      "prompts: (2/3 H2 + 4/3 H3) / 2 of the n-gram distributions, x100 (--fluency).",
                      "REVIVE Eq. 13; ROME `generate_fast` + `n_gram_entropy`"),
    "consistency": Metric("percent", "TF-IDF cosine between the generations and reference texts about target_new "
                          "(attribute snippets), x100 (--consistency).", "ROME `tfidf_similarity` (REVIVE App. E.4)"),
    # -- general ability ---------------------------------------------------------------------
    "accuracy": Metric("fraction", "Zero-shot accuracy of a general-ability task (task column; 'mean' averages the "
                       "tasks): the choice with the lowest mean NLL.", "REVIVE App. E.5 (GLUE), AlphaEdit's harness"),
    "f1": Metric("fraction", "F1 of the same predictions (binary, choice 1 positive; macro for more choices).",
                 "scikit-learn `f1_score`, AlphaEdit's harness"),
    "mcc": Metric("correlation", "Matthews correlation of the same predictions (CoLA's metric).",
                  "scikit-learn `matthews_corrcoef`"),
    "text_nll": Metric("nats/token", "Held-out text NLL per token (task 'heldout_text'): general language ability "
                       "as one continuous number.", "spectra (`HeldoutText`)"),
    "text_perplexity": Metric("ratio", "exp(text_nll).", "spectra (`HeldoutText`)"),
    # -- spectral drift of each edited matrix (drift) --------------------------------------
    "LS": Metric("fraction", "Cosine of the top-`metric_tau` reconstructions of W_t and W_0 (Frobenius inner "
                 "product).", "REVIVE Eq. 3"),
    "SS_k": Metric("count", "Rows of the SS matrix: the dominant rank k of W_0 at `metric_tau` (Eq. 5).",
                   "REVIVE Eq. 5"),
    "SS_diag_mean": Metric("fraction", f"Mean of SS[i, i]: {_SS}.", "REVIVE Sec. 2.3, Fig. 5"),
    "SS_diag_min": Metric("fraction", "Smallest SS[i, i] over the dominant vectors.", "REVIVE Sec. 2.3"),
    "SS_row_max_mean": Metric("fraction", "Mean over dominant vectors of their best |cos| with any original vector "
                              "(the paper's maximum SS).", "REVIVE App. F.2, Fig. 12"),
    "SS_row_max_min": Metric("fraction", "Smallest of those best matches.", "REVIVE App. F.2"),
    "SS_argmax_match": Metric("fraction", "Share of dominant vectors whose best match is their own index.",
                              "spectra (`ss_summary`)"),
    "SS_subspace_overlap": Metric("fraction", "Mean over dominant vectors of their squared projection onto W_0's "
                                  "top-k span: 1 when the dominant subspace is unchanged.", "spectra (`ss_summary`)"),
    "SS_protected_diag_min": Metric("fraction", "Smallest SS[i, i] over the arm's protected triplets (metric_tau's "
                                    "top k where nothing is protected): 1 when they are intact and keep their rank "
                                    "order.", "spectra (REVIVE Fig. 13)"),
    "SS_protected_match_min": Metric("fraction", "Smallest best |cos| of a protected vector of W_0 with any vector of "
                                     "W_t: 1 when intact wherever they now rank.", "spectra (`ss_best_match`)"),
    "protected_triplet_residual": Metric("ratio", "max over protected triplets of max(||W_t v_i - s_i u_i||, "
                                         "||W_t^T u_i - s_i v_i||) / s_i: 0 when REVIVE kept them exactly.",
                                         "spectra (REVIVE Eq. 6's guarantee)"),
    "protected_dim": Metric("count", "Triplets of W_0 the arm's REVIVE filter protects at this site (chosen by "
                            "--protect, as many as tau buys or --protect-dim); 0 in the off arm and at measured sites "
                            "the editor does not write.", "REVIVE Eq. 5; spectra (`Protection`)"),
    "fro_ratio": Metric("ratio", "||W_t||_F / ||W_0||_F.", "REVIVE Sec. 2.3 (norm growth)"),
    "delta_fro": Metric("weight norm", "||W_t - W_0||_F.", "spectra (`drift_stats`)"),
    "delta_fro_rel": Metric("ratio", "||W_t - W_0||_F / ||W_0||_F.", "spectra (`drift_stats`)"),
    "delta_spectral_rel": Metric("ratio", "||W_t - W_0||_2 / sigma_1(W_0): the update's size against the weight's "
                                 "largest singular value.", "spectra (`drift_stats`)"),
    "sigma_k_rel": Metric("ratio", "sigma_k(W_0) / sigma_1(W_0) at metric_tau's k, recorded at round 0: LS and the "
                          "rank-ordered SS diagonal follow W_0's directions only while delta_spectral_rel stays well "
                          "below it.", "spectra (Davis-Kahan; `regime_note`)"),
    "spectral_norm_ratio": Metric("ratio", "sigma_1(W_t) / sigma_1(W_0).", "spectra (`drift_stats`)"),
    "functional_change": Metric("ratio", "RMS over corpus keys k of ||(W_t - W_0) k|| / RMS of ||W_0 k||: how much "
                                "the update changes what the matrix computes on inputs it really sees (needs a "
                                "statistics corpus).", "spectra (`functional_change`; reference editing-regime.md)"),
    "spectral_norm": Metric("weight norm", "sigma_1 of the matrix (drift: of W_t).", "spectra (`Spectrum`)"),
    "condition_number": Metric("ratio", "sigma_1 / sigma_min (drift: of W_t).", "spectra (`Spectrum`)"),
    "effective_rank": Metric("count", "exp of the entropy of the normalised singular values (Roy & Vetterli 2007; "
                             "drift: of W_t).", "spectra (`Spectrum`)"),
    # -- capacity of the protected complement (capacity) -----------------------------------
    "round_efficacy": Metric("percent", "Efficacy on the edits of this round alone (round 0: the first round's "
                             "records, before editing).", f"REVIVE Eq. 10; {_CF}"),
    "update_rank": Metric("count", "Rank of the accumulated update W_t - W_0 inside the protected complement, "
                          "(I - U_k U_k^T)(W_t - W_0)(I - V_k V_k^T): singular values above 1e-6 of its largest and "
                          "above 4 eps ||W_t||_F (the weights' rounding).",
                          "spectra (`complement_usage`)"),
    "update_effective_rank": Metric("count", "Entropy effective rank (Roy & Vetterli 2007) of that projected update.",
                                    "spectra (`complement_usage`)"),
    "complement_rank": Metric("count", "min(m, n) - protected_dim: the largest rank an update confined to the "
                              "protected complement can have (min(m, n) in the off arm).", "spectra (`complement_usage`)"),
    "remaining_dim": Metric("count", "complement_rank - update_rank: complement directions the accumulated update has "
                            "not used yet.", "spectra (`complement_usage`)"),
    "edits_absorbed": Metric("count", "Edits made before the first round whose round_efficacy fell below --threshold; "
                             "where capacity_reached is 0, every edit of the budget (a lower bound).",
                             "spectra (`capacity`)"),
    "capacity_reached": Metric("fraction", "1 when a round's efficacy fell below --threshold within the budget, 0 when "
                               "the budget ran out first; averaged over seeds, the share of runs that failed.",
                               "spectra (`capacity`)"),
    # -- representation shift (drift) ------------------------------------------------------
    "cosine": Metric("fraction", f"Mean over prompts of cos(x_i, y_i); {_SHIFT}.", "spectra (`mean_cosine`)"),
    "cka": Metric("fraction", "Linear CKA of x and y: 1 = same geometry up to rotation and scale.",
                  "Kornblith et al. 2019; spectra (`linear_cka`)"),
    "drift": Metric("ratio", "Mean over prompts of ||y_i - x_i|| / ||x_i||.", "evaluation reference; spectra "
                    "(`relative_drift`)"),
    "displacement": Metric("ratio", "Mean ||y_i - x_i|| divided by the spread of x (RMS distance to its centroid).",
                           "spectra (`relative_displacement`)"),
    "knn_overlap": Metric("fraction", "Mean share of each prompt's 10 nearest neighbours kept after editing.",
                          "REVIVE Fig. 10 (t-SNE neighbourhoods); spectra (`knn_overlap`)"),
    "R_k_median": Metric("ratio", "Median over principal directions u_k of x of R_k = ||(y - x) u_k|| / sigma_k; "
                         "R_k >> 1: the edits overwhelmed that direction.", "spectra (`relative_change_rate`)"),
    "R_k_max": Metric("ratio", "Largest R_k.", "spectra (`relative_change_rate`)"),
    "R_k_mean": Metric("ratio", "Mean R_k.", "spectra (`relative_change_rate`)"),
    "tsne": Metric("coordinate", "A joint t-SNE point (columns x, y, phase pre/post, prompt_idx; value empty), "
                   "with --tsne.", "REVIVE Fig. 10"),
    # -- timing (drift) ------------------------------------------------------------------------
    "seconds_edit": Metric("seconds", "Wall time of the round's edit (z optimisation, solves, writes).", "spectra"),
    "seconds_observe": Metric("seconds", "Wall time of the round's measurements.", "spectra"),
    # -- spectrum ------------------------------------------------------------------------------
    "m": Metric("count", "Rows of the matrix (output size).", "spectra (`spectrum_table`)"),
    "n": Metric("count", "Columns of the matrix (input size).", "spectra (`spectrum_table`)"),
    "rank": Metric("count", "min(m, n).", "spectra (`spectrum_table`)"),
    "k": Metric("count", "Dominant rank: fewest top singular values holding tau of sum(sigma) (tau column).",
                "REVIVE Eq. 5"),
    "k_over_rank": Metric("fraction", "k / rank.", "REVIVE Eq. 5, Sec. 2.2"),
    "fro_norm": Metric("weight norm", "||W||_F.", "spectra (`Spectrum`)"),
    # -- trace ---------------------------------------------------------------------------------
    "trace_probability": Metric("fraction", "P(true object) with one clean block output restored at a position "
                                "(layer column), or clean / corrupted baselines (layer empty).",
                                "ROME causal tracing (Meng et al. 2022, Fig. 1)"),
    # -- editability ---------------------------------------------------------------------------
    "trace_recovery": Metric("fraction", "(trace_probability - corrupted) / (clean - corrupted): the share of the fact "
                             "one restored block output brings back.", "ROME causal tracing; spectra"),
    "p_true": Metric("fraction", "P(target_true) after a record's rewrite prompt, before editing (whole "
                     "continuation).", "ENCORE Table 1 (calibration of the original fact)"),
    "p_new": Metric("fraction", "P(target_new) after a record's rewrite prompt, before editing.", "ENCORE Table 1"),
    "mlp_share_subject": Metric("ratio", "||W k|| / ||h|| at the subject's last token: the edited MLP's write against "
                                "its block's output (mean over records).", "spectra (editing regime)"),
    "subject_key_ratio": Metric("ratio", "RMS ||k|| at the subject's last token / RMS ||k|| over the statistics "
                                "corpus (sqrt tr C).", "spectra (editing regime)"),
    "covariance_fill": Metric("fraction", "Share of the key covariance C's eigenvalues above 1e-4 of the largest.",
                              "spectra (editing regime)"),
    "write_demand": Metric("ratio", "One edit: ||dW k|| / ||W k||, the change asked of the MLP's own output at the "
                           "subject.", "spectra (`edit_cost`)"),
    "key_gain": Metric("fraction", "||W k|| / (||k|| sigma_1(W)): W's gain on the subject key against its top gain.",
                       "spectra (`edit_cost`)"),
    "key_gain_isotropic": Metric("fraction", "||W||_F / (sqrt(n) sigma_1(W)): key_gain's RMS over isotropic random "
                                 "keys, its reference (a Gaussian m x n matrix: about sqrt(m) / (sqrt(m) + sqrt(n))).",
                                 "spectra (`isotropic_key_gain`)"),
    "key_gain_corpus": Metric("fraction", "sqrt(tr(W C W^T) / tr C) / sigma_1(W): W's RMS gain on the statistics "
                              "corpus's keys (C = E[k k^T]) against its top gain; above key_gain when W's strongest "
                              "directions serve the text at large rather than the subject keys.",
                              "spectra (`corpus_key_gain`)"),
    "subject_shift": Metric("ratio", "One edit: ||h' - h|| / ||h||, block output at the last edited layer and the "
                            "editor's lookup position in the rewrite prompt (the subject's last token by default), "
                            "after against before the edit (MEMIT's z is h + delta there, ||delta|| <= "
                            "clamp_norm_factor ||h||).", "spectra (editability)"),
    "off_key_excess": Metric("ratio", "One edit: ||dW||_2 ||k|| / ||dW k|| >= 1, how much more the update stretches "
                             "another direction than the key; delta_spectral_rel = write_demand x key_gain x "
                             "off_key_excess.", "spectra (`edit_cost`)"),
}


def unit_of(metric: str) -> str:
    """The unit of a metric name; a name missing from the glossary is a programming error, reported as one."""
    if metric not in GLOSSARY:
        raise KeyError(f"metric {metric!r} has no glossary entry in spectra/glossary.py; add one (and to the README)")
    return GLOSSARY[metric].unit


def with_units(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a ``unit`` column from their metric's glossary entry."""
    return [{**row, "unit": unit_of(row["metric"])} for row in rows]


def glossary_markdown() -> str:
    """The README's glossary table, one row per metric name."""
    lines = ["| metric | unit | definition | source |", "| --- | --- | --- | --- |"]
    lines += [f"| `{name}` | {m.unit} | {m.definition} | {m.source} |" for name, m in GLOSSARY.items()]
    return "\n".join(lines)
