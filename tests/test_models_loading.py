"""Loading by alias or path works offline, and a missing model is a one-paragraph error."""

from __future__ import annotations

import pytest
import torch

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


def test_a_missing_known_model_says_what_it_needs_and_how_to_download_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpectraError) as err:
        load_model("llama3", device="cpu")
    message = str(err.value)
    assert "`hf download meta-llama/Meta-Llama-3-8B-Instruct`" in message and "huggingface-cli" not in message
    assert "8.03 B parameters" in message and "16.1 GB on disk (bfloat16 checkpoint)" in message
    assert "32.1 GB as float32, 16.1 GB as float16 or bfloat16" in message


def test_dtype_auto_keeps_the_checkpoints_dtype(tmp_path):
    from test_editing_support import tiny_model

    model = tiny_model("llama")
    model.model.half().save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), device="cpu", dtype="auto").dtype == torch.float16
    assert load_model(str(tmp_path), device="cpu").dtype == torch.float32


def test_device_map_goes_through_accelerate_or_says_to_install_it(monkeypatch, tmp_path):
    """No GPU here: the placement reaches from_pretrained (the model is then not moved), and accelerate is optional."""
    import importlib.util

    import transformers
    from test_editing_support import tiny_model

    model = tiny_model("llama")
    model.model.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    with pytest.raises(SpectraError, match=r"pip install 'spectra\[large\]'"):
        load_model(str(tmp_path), device="cpu", device_map="auto")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "accelerate" else real_find_spec(name, *a))
    seen = {}

    def placed(source, **kwargs):
        seen.update(kwargs)
        return model.model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", placed)
    assert load_model(str(tmp_path), device="cpu", device_map="auto").model is model.model
    assert seen["device_map"] == "auto"
