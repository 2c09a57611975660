"""Causal tracing: invariants any correct trace satisfies, on random models of every family."""

from __future__ import annotations

import pytest
from test_editing_support import FAMILIES, tiny_model
from test_editing_support import single_thread  # noqa: F401 - autouse fixture, applied to this module

from spectra.errors import SpectraError
from spectra.evaluation.tracing import causal_trace, subject_token_span


def record(subject: str, template: str = "the city of {} is near", true: str = "paris") -> dict:
    return {"requested_rewrite": {"prompt": template, "subject": subject, "target_new": {"str": "rome"},
                                  "target_true": {"str": true}}}


RECORDS = [record("alice bob"), record("carol", "i think {} lives in", "oslo"), record("dave erin frank")]


@pytest.mark.parametrize("family", FAMILIES)
def test_restorations_that_must_equal_the_clean_or_corrupted_run(family: str) -> None:
    model = tiny_model(family)
    trace = causal_trace(model, RECORDS, noise_scale=3.0)
    assert trace.facts == 3 and 0 < trace.clean < 1 and trace.corrupted != pytest.approx(trace.clean, abs=1e-6)
    # The last block's output at the last token is all the logits see; at the subject it is unseen.
    assert trace.restored["last"][-1] == pytest.approx(trace.clean, rel=1e-5)
    assert trace.restored["subject_last"][-1] == pytest.approx(trace.corrupted, rel=1e-5)
    assert {row["position"] for row in trace.rows()} == {"subject_last", "last", "clean", "corrupted"}


def test_without_noise_every_run_is_the_clean_run() -> None:
    trace = causal_trace(tiny_model("llama"), RECORDS, noise_scale=0.0)
    assert trace.corrupted == pytest.approx(trace.clean)
    for values in trace.restored.values():
        assert values == pytest.approx([trace.clean] * len(values))


def test_subject_span_and_errors() -> None:
    tok = tiny_model("gpt2").tokenizer
    assert subject_token_span(tok, "i think {} lives in", "dave erin frank") == (2, 5)
    assert subject_token_span(tok, "{} lives in", "alice") == (0, 1)
    with pytest.raises(SpectraError, match="at least one record"):
        causal_trace(tiny_model("llama"), [])
    with pytest.raises(SpectraError, match="noise_scale"):
        causal_trace(tiny_model("llama"), RECORDS, noise_scale=-1.0)
