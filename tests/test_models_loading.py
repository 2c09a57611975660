"""Loading by alias or path works offline, and a missing model is a one-paragraph error."""

from __future__ import annotations

import pytest

from spectra.errors import SpectraError
from spectra.models import ALIASES, load_model, locally_available
from spectra.models.loading import resolve_device, resolve_dtype


def test_missing_hub_model_is_a_clear_error_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpectraError, match="not in the local Hugging Face cache"):
        load_model("spectra-test/does-not-exist", device="cpu")


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(SpectraError, match="has no config.json"):
        load_model(str(tmp_path / "nowhere"), device="cpu")


def test_aliases_resolve_and_report_availability(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert set(ALIASES) >= {"tiny", "gpt2", "gpt2-xl", "gpt-j", "llama3"}
    available, where = locally_available("llama3")
    assert not available and where == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_bad_device_and_dtype_are_clear_errors():
    with pytest.raises(SpectraError, match="Unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(SpectraError, match="Unknown device"):
        resolve_device("tpu:banana")
