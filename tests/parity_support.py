"""What the parity tests and the fixture generator share: fixture paths, the two tiny models, requests, scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
MODEL_KINDS = ("gpt2", "llama")
EDITOR_NAMES = ("memit", "alphaedit", "rect", "prune", "nse")
SPECIAL = "<|endoftext|>"


def settings() -> dict[str, Any]:
    """The pinned inputs and hyperparameters of every recorded run (``settings.json``)."""
    return json.loads((FIXTURES / "settings.json").read_text())


def load_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer both models share: no BOS, pad = eos, right padding (as GPT-2's)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(FIXTURES / "tokenizer.json")),
        bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL, padding_side="right",
    )


def build_model(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    """An untrained GPT-2 or Llama from a config dict."""
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**config))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**config))
    raise ValueError(f"unknown model kind {kind!r}")


def load_model(kind: str) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The stored tiny model in float32 (stored in float16: both sides edit the same rounded weights)."""
    config = json.loads((FIXTURES / kind / "config.json").read_text())
    model = build_model(kind, config)
    state = {name: value.float() for name, value in load_file(str(FIXTURES / kind / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    model.config._name_or_path = f"parity-{kind}"
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, load_tokenizer()


def down_weights(model: torch.nn.Module, kind: str, layers: list[int]) -> dict[int, torch.Tensor]:
    """The edited down projections in (out, in) layout (GPT-2's Conv1D stores (in, out))."""
    if kind == "gpt2":
        return {layer: model.transformer.h[layer].mlp.c_proj.weight.detach().T.clone() for layer in layers}
    return {layer: model.model.layers[layer].mlp.down_proj.weight.detach().clone() for layer in layers}


def target_probabilities(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, requests: list[dict]) -> torch.Tensor:
    """Per request, the mean probability of the tokens of " target_new" after the filled prompt (teacher forced)."""
    out = []
    with torch.no_grad():
        for request in requests:
            prompt = request["prompt"].format(request["subject"])
            prompt_ids = tokenizer(prompt)["input_ids"]
            target_ids = tokenizer(prompt + " " + request["target_new"])["input_ids"][len(prompt_ids):]
            logits = model(torch.tensor([prompt_ids + target_ids[:-1]])).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            steps = [logp[len(prompt_ids) - 1 + j, token] for j, token in enumerate(target_ids)]
            out.append(float(torch.stack(steps).mean().exp()))
    return torch.tensor(out, dtype=torch.float64)


class PinnedStatistics:
    """Key statistics that hand out given covariances (the editors' ``statistics`` interface): the
    recorded official C, so both implementations solve with the same one."""

    def __init__(self, covariances: dict[int, torch.Tensor]) -> None:
        self.covariances = covariances

    @classmethod
    def recorded(cls, kind: str) -> "PinnedStatistics":
        """The official C of ``kind``'s edited layers, from its fixture."""
        stored = load_file(str(FIXTURES / kind / "covariance.safetensors"))
        return cls({int(name.split(".")[1]): c for name, c in stored.items()})

    def second_moments(
        self, model: Any, layers: Sequence[int], fingerprint: str | None = None, compute: bool = True
    ) -> dict[int, torch.Tensor]:
        return {layer: self.covariances[layer].clone().to(model.device) for layer in layers}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F in float64 (the absolute difference where expected is zero)."""
    difference = float((actual.double() - expected.double()).norm())
    scale = float(expected.double().norm())
    return difference / scale if scale > 0 else difference
