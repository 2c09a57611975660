"""Probability metrics on a fake LM with fixed next-token distributions, checked against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_model
from fixtures.fake_lm import WORDS, BigramLM, word_tokenizer

from spectra.data.counterfact import load_counterfact
from spectra.data.zsre import load_zsre
from spectra.evaluation.consistency import fit_tfidf
from spectra.evaluation.counterfact import (
    CounterFactPlan, GenerationOptions, counterfact_rows, evaluate_counterfact, prepare_counterfact,
)
from spectra.evaluation.general import GeneralAbility, HeldoutText, choice_nlls, classification_metrics
from spectra.evaluation.rows import ROW_COLUMNS, aggregate, row, summarize
from spectra.evaluation.scoring import encode_pairs, score_continuations
from spectra.evaluation.zsre import evaluate_zsre
from spectra.errors import SpectraError

FIXTURES = Path(__file__).parent / "fixtures"
REST_IN = 0.1 / (len(WORDS) - 2)  # p(any other word | "in")
REST_Q = 0.3 / (len(WORDS) - 1)  # p(any other word | "?")


@pytest.fixture(scope="module")
def lm() -> BigramLM:
    model = BigramLM()
    model.set_next("is", {"paris": 0.5, "rome": 0.25})
    model.set_next("in", {"rome": 0.6, "paris": 0.3})
    model.set_next("?", {"rome": 0.7})
    model.set_next("rome", {"is": 0.5, "city": 0.2})
    model.set_next("lives", {"in": 0.9})
    return model


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def _by(rows: list[dict], case_id: int, metric: str) -> list[float]:
    return [r["value"] for r in sorted(rows, key=lambda r: r["prompt_idx"]) if r["case_id"] == case_id and r["metric"] == metric]


def test_scorer_gives_mean_token_nll_and_argmax_hits(lm: BigramLM, tok) -> None:
    pairs = encode_pairs(tok, [("where does ann live ?", "rome city"), ("the capital of france is", "paris")])
    two, one = score_continuations(lm, pairs, pad_id=1, batch_size=1)
    assert two.token_nll.tolist() == pytest.approx([-math.log(0.7), -math.log(0.2)], rel=1e-5)
    assert two.mean_nll == pytest.approx((-math.log(0.7) - math.log(0.2)) / 2, rel=1e-5)
    assert two.token_correct.tolist() == [True, False] and not two.all_correct and two.token_accuracy == 0.5
    assert one.mean_nll == pytest.approx(math.log(2), rel=1e-5) and one.all_correct
    with pytest.raises(SpectraError, match="Cannot score pair 0"):
        score_continuations(lm, [([], [3])], pad_id=1)


def test_scorer_shares_inputs_and_matches_scoring_each_pair_alone() -> None:
    """Pairs with the same prefix + continuation[:-1] share one row; scores equal one pair per pass."""
    model = make_tiny_model("llama")
    pairs = [([5, 6, 7], [8]), ([5, 6, 7], [9]), ([5, 6], [7, 8]), ([5, 6], [7, 9, 10]), ([11], [12, 13]), ([5, 6, 7], [8])]
    fed: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    together = score_continuations(model, pairs, pad_id=0, batch_size=8)
    handle.remove()
    assert fed == [3], "four pairs read the logits after (5, 6, 7); the others need (5, 6, 7, 9) and (11, 12)"
    for pair, score in zip(pairs, together):
        (alone,) = score_continuations(model, [pair], pad_id=0)
        np.testing.assert_allclose(score.token_nll, alone.token_nll, rtol=1e-5, atol=1e-6)
        assert score.token_correct.tolist() == alone.token_correct.tolist()
        assert len(score.token_nll) == len(pair[1])


def test_per_record_plans_concatenate_to_the_plan_of_all_records(lm: BigramLM, tok) -> None:
    records = load_counterfact(FIXTURES / "counterfact_small.json")
    whole = prepare_counterfact(tok, records)
    joined = CounterFactPlan.concat([prepare_counterfact(tok, [record]) for record in records])
    assert joined == whole
    assert counterfact_rows(lm, joined) == counterfact_rows(lm, whole)
    with pytest.raises(SpectraError, match="at least one"):
        CounterFactPlan.concat([])


def test_a_plan_restricted_to_rewrite_prompts_scores_them_as_the_whole_plan_does(lm: BigramLM, tok) -> None:
    whole = prepare_counterfact(tok, load_counterfact(FIXTURES / "counterfact_small.json"))
    rewrite = whole.restricted(("rewrite",))
    assert {ref.prompt_kind for ref in rewrite.refs} == {"rewrite"}
    assert len(rewrite.refs) == len({ref.case_id for ref in whole.refs}) < len(whole.refs)
    expected = [row for row in counterfact_rows(lm, whole) if row["prompt_kind"] == "rewrite"]
    assert counterfact_rows(lm, rewrite) == expected


def test_counterfact_rows_match_hand_computed_values(lm: BigramLM, tok) -> None:
    rows = evaluate_counterfact(lm, tok, load_counterfact(FIXTURES / "counterfact_small.json"), batch_size=4)
    assert set(rows[0]) == set(ROW_COLUMNS)
    assert _by(rows, 0, "rewrite_nll_new") == pytest.approx([math.log(4)], rel=1e-5)
    assert _by(rows, 0, "rewrite_nll_true") == pytest.approx([math.log(2)], rel=1e-5)
    assert _by(rows, 0, "rewrite_success") == [0.0]
    assert _by(rows, 0, "rewrite_diff") == pytest.approx([-0.25], rel=1e-5)
    assert _by(rows, 0, "rewrite_acc") == [0.0]
    assert _by(rows, 0, "paraphrase_success") == [1.0, 1.0]
    assert _by(rows, 0, "paraphrase_diff") == pytest.approx([0.3, 0.7 - REST_Q], rel=1e-5)
    assert _by(rows, 0, "paraphrase_acc") == [1.0, 1.0]
    assert _by(rows, 0, "neighborhood_success") == [1.0]
    assert _by(rows, 0, "neighborhood_diff") == pytest.approx([0.25], rel=1e-5)
    assert _by(rows, 0, "neighborhood_acc") == [1.0]
    assert _by(rows, 7, "rewrite_diff") == pytest.approx([REST_IN - 0.6], rel=1e-5)
    assert _by(rows, 7, "paraphrase_success") == [0.0]
    assert _by(rows, 7, "neighborhood_success") == [1.0, 1.0]
    paper = aggregate(rows)
    assert paper["rewrite_success"] == 0.0 and paper["paraphrase_success"] == 50.0
    assert paper["neighborhood_success"] == 100.0 and paper["score"] == 0.0
    assert paper["rewrite_diff"] == pytest.approx(100 * (-0.25 + REST_IN - 0.6) / 2, rel=1e-5)
    assert paper["rewrite_nll_new"] == pytest.approx((math.log(4) - math.log(REST_IN)) / 2, rel=1e-5)


def test_batched_and_unbatched_counterfact_rows_agree(lm: BigramLM, tok) -> None:
    records = load_counterfact(FIXTURES / "counterfact_small.json")
    wide = pd.DataFrame(evaluate_counterfact(lm, tok, records, batch_size=64))
    narrow = pd.DataFrame(evaluate_counterfact(lm, tok, records, batch_size=1))
    pd.testing.assert_frame_equal(wide, narrow)


def test_counterfact_metrics_refuse_zsre_records(lm: BigramLM, tok) -> None:
    with pytest.raises(SpectraError, match="no target_true"):
        prepare_counterfact(tok, load_zsre(FIXTURES / "zsre_small.json"))


def test_zsre_token_accuracy_matches_hand_computed_values(lm: BigramLM, tok) -> None:
    rows = evaluate_zsre(lm, tok, load_zsre(FIXTURES / "zsre_small.json"))
    assert _by(rows, 0, "rewrite_acc") == [0.5]  # "rome" is the argmax after "?", "city" is not after "rome"
    assert _by(rows, 0, "paraphrase_acc") == [0.0]
    assert _by(rows, 0, "neighborhood_acc") == [1.0]
    assert _by(rows, 1, "rewrite_acc") == [0.0]
    assert aggregate(rows) == {"neighborhood_acc": 100.0, "paraphrase_acc": 0.0, "rewrite_acc": 25.0}


def test_aggregate_averages_prompts_within_a_record_first() -> None:
    rows = [row(0, "neighborhood_success", "neighborhood", i, v) for i, v in enumerate([1, 1, 1, 0])]
    rows += [row(1, "neighborhood_success", "neighborhood", 0, 0.0)]
    rows += [row(c, m, m.split("_")[0], 0, 1.0) for c in (0, 1) for m in ("rewrite_success", "paraphrase_success")]
    paper = aggregate(rows)
    assert paper["neighborhood_success"] == pytest.approx(37.5)  # (0.75 + 0) / 2, not 3/5
    assert paper["score"] == pytest.approx(3 / (1 / 100 + 1 / 100 + 1 / 37.5))
    table = summarize([{**r, "arm": "revive"} for r in rows], by=("arm",))
    assert list(table.columns) == ["arm", "metric", "value", "std", "n_records"]
    assert table.set_index("metric").loc["neighborhood_success", "std"] == pytest.approx(100 * math.sqrt(0.28125))
    assert aggregate([]) == {}


def test_multiple_choice_scoring_and_general_ability(lm: BigramLM, tok) -> None:
    ability = GeneralAbility.from_file(FIXTURES / "general_items.json", batch_size=2)
    nlls = choice_nlls(lm, tok, ability.items["capitals"])
    assert nlls[0] == pytest.approx([math.log(2), math.log(4)], rel=1e-5)
    results = ability(lm, tok)
    capitals = results["capitals"]  # gold [0, 1, 0], predicted [0, 1, 1]
    assert capitals["accuracy"] == pytest.approx(2 / 3)
    assert capitals["f1"] == pytest.approx(2 / 3)  # class 1: precision 1/2, recall 1
    assert capitals["mcc"] == pytest.approx(0.5)  # (1*1 - 1*0) / sqrt(2*1*2*1)
    assert results["three"]["accuracy"] == 1.0 and results["three"]["n"] == 1.0


def test_heldout_text_nll_is_the_token_weighted_mean_after_the_first_token(lm: BigramLM, tok, tmp_path) -> None:
    """'ann lives in rome' scores lives|ann, in|lives, rome|in; a second text's tokens weigh in by count."""
    uniform = -math.log(1 / len(WORDS))
    first = [uniform, -math.log(0.9), -math.log(0.6)]
    second = [-math.log(0.5)]  # 'rome is': is|rome
    measured = HeldoutText(["ann lives in rome", "rome is", "  "])(lm, tok)
    assert measured["tokens"] == 4
    assert measured["nll"] == pytest.approx(sum(first + second) / 4, rel=1e-5)
    assert measured["perplexity"] == pytest.approx(math.exp(measured["nll"]), rel=1e-6)
    with pytest.raises(SpectraError, match="empty"):
        HeldoutText(["", " "])
    with pytest.raises(SpectraError, match="does not exist"):
        HeldoutText.from_file(tmp_path / "missing.txt")


def test_classification_metrics_macro_f1_for_more_than_two_choices() -> None:
    metrics = classification_metrics([0, 1, 2, 2], [0, 1, 1, 2], 3)
    assert metrics["accuracy"] == 0.75
    assert metrics["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_generation_rows_with_consistency(lm: BigramLM, tok) -> None:
    records = load_counterfact(FIXTURES / "counterfact_small.json")
    references = {("P36", "Q220"): ["rome is a city in italy"]}
    vectorizer = fit_tfidf(["rome is a city in italy", "paris is a city in france", "ann lives in berlin"])
    rows = evaluate_counterfact(
        lm, tok, records, generator=torch.Generator().manual_seed(0), options=GenerationOptions(max_out_len=8),
        references=references, vectorizer=vectorizer,
    )
    entropy = [r for r in rows if r["metric"] == "ngram_entropy"]
    assert [(r["case_id"], r["prompt_idx"]) for r in entropy] == [(0, 0), (0, 1), (7, 0)]
    consistency = [r for r in rows if r["metric"] == "reference_score"]
    assert [(r["case_id"], r["prompt_idx"]) for r in consistency] == [(0, -1)]
    assert 0.0 <= consistency[0]["value"] <= 1.0
