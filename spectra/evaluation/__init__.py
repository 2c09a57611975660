"""Evaluation: CounterFact/zsRE edit metrics, fluency, consistency, general ability, representation shift, causal tracing."""

from spectra.evaluation.counterfact import (
    CounterFactPlan, GenerationOptions, counterfact_rows, evaluate_counterfact, generation_rows, prepare_counterfact,
)
from spectra.evaluation.general import GeneralAbility, choice_nlls, classification_metrics, predict
from spectra.evaluation.representations import hidden_states, joint_tsne, shift_metrics, shift_rows
from spectra.evaluation.rows import ROW_COLUMNS, aggregate, summarize
from spectra.evaluation.scoring import ContinuationScore, score_continuations
from spectra.evaluation.tracing import CausalTrace, causal_trace, subject_token_span
from spectra.evaluation.zsre import ZsrePlan, evaluate_zsre, prepare_zsre, zsre_rows

__all__ = [
    "ROW_COLUMNS", "CausalTrace", "ContinuationScore", "CounterFactPlan", "GeneralAbility", "GenerationOptions", "ZsrePlan",
    "aggregate", "causal_trace", "choice_nlls", "classification_metrics", "counterfact_rows", "evaluate_counterfact",
    "evaluate_zsre", "generation_rows", "hidden_states", "joint_tsne", "predict", "prepare_counterfact",
    "prepare_zsre", "score_continuations", "shift_metrics", "shift_rows", "subject_token_span", "summarize", "zsre_rows",
]
