"""Shared builders for the editing tests: tiny random-init models of every family and a word-level tokenizer."""

from __future__ import annotations

import random
from typing import Iterator

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

from spectra.data.records import EditRequest
from spectra.models.adapters import adapter_for
from spectra.models.loading import LoadedModel

SUBJECTS = ["alice", "bob", "carol", "dave", "erin", "frank"]
OBJECTS = ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito"]
FILLER = [
    "the", "a", "therefore", "because", "i", "you", "lives", "in", "is", "works", "city", "of", "and",
    "likes", "near", "big", "small", "old", "new", "river", "house", "sees", "with", ".", ",",
]
FAMILIES = ("llama", "gpt2", "gptj")

#: Editor hyperparameters for the random models: few steps, small lambda, a light weight decay
#: (hidden norms are ~1, so ||delta|| / ||h0||^2 would dominate), and last-token keys (random
#: attention moves nothing from the subject to the last position).
SMALL: dict[str, object] = dict(
    layers=(1, 2), key_position="last", v_num_grad_steps=20, v_lr=0.5, v_weight_decay=1e-3,
    clamp_norm_factor=4.0, mom2_update_weight=0.1, mom2_n_samples=None, max_length=32, context_length=6,
)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: these matrices are tiny, and on a busy 2-core machine thread contention
    made each forward pass ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary (no BOS; pad and eos are separate tokens)."""
    words = ["[PAD]", "[UNK]", "[EOS]", *FILLER, *SUBJECTS, *OBJECTS, "The", "Therefore", "Because", "I", "You"]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def tiny_model(family: str, seed: int = 0, n_layers: int = 4) -> LoadedModel:
    """A random-init causal LM of ``family`` (d_model 32, d_k 64 or 128), float32, eval mode."""
    tok = tokenizer()
    torch.manual_seed(seed)
    vocab = len(tok)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab, initializer_range=0.1,   hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, initializer_range=0.1,   n_embd=32, n_layer=n_layers, n_head=4, n_positions=64,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    elif family == "gptj":
        config = GPTJConfig(
            vocab_size=vocab, initializer_range=0.1,   n_embd=32, n_layer=n_layers, n_head=4, n_positions=64, rotary_dim=4,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        )
        model = GPTJForCausalLM(config)
    else:
        raise ValueError(family)
    # A random model's logits are nearly uniform; sharpening the unembedding lets a few Adam steps on
    # the residual make a chosen target the top prediction, as in a trained model.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, adapter=adapter_for(model), name=f"test-{family}", source="memory")


def corpus(n_docs: int = 40, seed: int = 0) -> list[str]:
    """Random short documents over the vocabulary (for key statistics)."""
    rng = random.Random(seed)
    words = FILLER + SUBJECTS + OBJECTS
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n_docs)]


def requests(model: LoadedModel, n: int = 3) -> list[EditRequest]:
    """``n`` facts '{subject} lives in' whose target is NOT the model's current top prediction."""
    out = []
    for i, subject in enumerate(SUBJECTS[:n]):
        prompt = "{} lives in"
        current = top_prediction(model, prompt.format(subject))
        target = next(o for o in OBJECTS[i:] + OBJECTS if o != current)
        out.append(EditRequest(case_id=i, prompt=prompt, subject=subject, target_new=target))
    return out


def top_prediction(model: LoadedModel, text: str) -> str:
    """The model's most likely next word after ``text``."""
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits[0, -1]
    return model.tokenizer.convert_ids_to_tokens(int(logits.argmax()))


def test_a_corpus_given_as_a_string_is_a_file_path(tmp_path) -> None:
    """A str corpus is a path: iterating it would make one-character documents and a meaningless C."""
    from spectra.editing.stats import read_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("alice lives in paris\n\nbob works in rome\n")
    assert read_corpus(str(corpus), None) == ["alice lives in paris", "bob works in rome"]
    assert read_corpus(["a b", " c "], 1) == ["a b"]
