"""The embedded tiny-world model: training is reproducible, and the shipped weights meet their targets."""

from __future__ import annotations

import pytest
import torch

from spectra.assets import tiny_model_dir
from spectra.data import tiny_world
from spectra.evaluation.general import GeneralAbility
from spectra.models import load_model
from spectra.models.tiny import WORLD_FILES, TinyTrainConfig, build_tokenizer, next_token_recall, train

SMALL = TinyTrainConfig(steps=6, hidden_size=32, intermediate_size=64, layers=2, heads=2, batch_size=8, warmup_steps=2)


@pytest.fixture(scope="module")
def world() -> tiny_world.TinyWorld:
    return tiny_world.build_world(seed=0)


@pytest.fixture(scope="module")
def shipped():
    return load_model("tiny", device="cpu")


def test_a_few_training_steps_lower_the_loss_and_are_reproducible(world):
    tokenizer = build_tokenizer(world.corpus)
    model_a, log = train(SMALL, world, tokenizer, progress=False)
    model_b, _ = train(SMALL, world, tokenizer, progress=False)
    assert log[-1]["loss"] < log[0]["loss"]
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs between two runs with one config"


def test_tokenizer_keeps_objects_single_tokens_and_adds_bos(world):
    tokenizer = build_tokenizer(world.corpus)
    ids = tokenizer("Dutch")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 2


def test_shipped_model_recalls_its_facts(shipped, world):
    trained, heldout = tiny_world.recall_prompts(world)
    assert next_token_recall(shipped.model, shipped.tokenizer, trained) >= 0.95
    assert next_token_recall(shipped.model, shipped.tokenizer, heldout) >= 0.80


def test_shipped_model_has_general_abilities(shipped):
    scores = GeneralAbility.from_file(tiny_model_dir() / WORLD_FILES["general"])(shipped.model, shipped.tokenizer)
    assert set(scores) == set(tiny_world.TASKS)
    for task, metrics in scores.items():
        assert metrics["accuracy"] >= 0.8, f"{task}: {metrics}"


def test_shipped_model_is_small_and_stored_in_half_precision():
    weights = tiny_model_dir() / "model.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    assert load_model("tiny", device="cpu", dtype="float32").dtype == torch.float32
