"""Shared fixtures: tiny random-initialised models of every supported family, built offline from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread: the suite's models are tiny, and on a 2-core machine shared with other work
    OpenMP threads waiting on each other made small tests 10-50x slower than single-threaded."""
    torch.set_num_threads(1)


def _tiny_configs() -> dict[str, tuple[type, object]]:
    return {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)),
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64,
            bos_token_id=1, eos_token_id=2)),
        "gptj": (transformers.GPTJForCausalLM, transformers.GPTJConfig(
            vocab_size=64, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64,
            bos_token_id=1, eos_token_id=2)),
        "bert": (transformers.BertForMaskedLM, transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64)),
    }


FAMILIES = tuple(_tiny_configs())


def make_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random-init model of ``family`` (llama, gpt2, gptj, bert) in eval mode."""
    model_cls, config = _tiny_configs()[family]
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture(params=FAMILIES)
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def world_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-world model trained for a few steps (the real training takes ~30 min; see README),
    with ``small_corpus.txt``: 300 corpus lines that keep the key-statistics pass short."""
    from spectra.models.tiny import WORLD_FILES, TinyTrainConfig, build_and_save

    directory = tmp_path_factory.mktemp("world-model")
    config = TinyTrainConfig(steps=3, hidden_size=32, intermediate_size=64, layers=4, heads=2, batch_size=8)
    build_and_save(config, directory, progress=False)
    corpus = (directory / WORLD_FILES["corpus"]).read_text().splitlines()[:300]
    (directory / "small_corpus.txt").write_text("\n".join(corpus) + "\n")
    return directory
