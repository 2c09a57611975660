"""Forward hooks on a loaded model: capture keys and block outputs, replace them, replay them, stop early.

Editors use them to read keys and inject z; causal tracing to corrupt and restore states.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from spectra.models.loading import LoadedModel


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every needed activation is captured."""


@contextmanager
def capture_inputs(model: LoadedModel, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input of each layer's key module (the MEMIT key), keyed by layer, on the model's first device.

    A model spread over devices (``--device-map auto``) computes each layer where it lives; its
    keys are gathered on one device, where the editors' solves run.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    device = model.device
    for layer in layers:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], layer: int = layer) -> None:
            captured[layer] = args[0].detach().to(device)
        handles.append(model.adapter.key_module(layer).register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _forward_hook(module: torch.nn.Module, hook: Callable[..., Any]) -> Iterator[None]:
    """``hook`` registered as ``module``'s forward hook for the duration of the block."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_hidden(model: LoadedModel, layer: int) -> Iterator[dict[int, torch.Tensor]]:
    """Record block ``layer``'s hidden-state output (tuple or bare tensor, by version), on the model's first device."""
    captured: dict[int, torch.Tensor] = {}
    device = model.device

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        captured[layer] = model.adapter.hidden_of(output).detach().to(device)

    with _forward_hook(model.adapter.block(layer), hook):
        yield captured


@contextmanager
def edit_hidden(model: LoadedModel, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace block ``layer``'s hidden states by ``edit(hidden)`` during the forward pass."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return model.adapter.with_hidden(output, edit(model.adapter.hidden_of(output)))

    with _forward_hook(model.adapter.block(layer), hook):
        yield


@contextmanager
def edit_embeddings(model: LoadedModel, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the input embeddings' output (batch, length, d) by ``edit(output)`` during the forward pass."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return edit(output)

    with _forward_hook(model.model.get_input_embeddings(), hook):
        yield


@contextmanager
def stop_after(model: LoadedModel, layer: int) -> Iterator[None]:
    """End the forward pass right after block ``layer`` (the caller catches ``StopForward``).

    Registered last, so hooks on the same block that capture its output run first.
    """

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raise StopForward

    with _forward_hook(model.adapter.block(layer), hook):
        yield


@contextmanager
def record_block_output(model: LoadedModel, layer: int) -> Iterator[list[Any]]:
    """Record block ``layer``'s raw outputs (in their own form: tensor or tuple), one per forward pass."""
    outputs: list[Any] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        outputs.append(output)

    with _forward_hook(model.adapter.block(layer), hook):
        yield outputs


@contextmanager
def replay_blocks(model: LoadedModel, layer: int, output: Any) -> Iterator[None]:
    """Blocks 0..``layer`` skip their computation: each returns ``output``, block ``layer``'s recorded output.

    Only block ``layer``'s value reaches the rest of the model (each skipped block ignores its
    input), so this equals a full forward pass whenever the recorded states came from the same
    input ids and weights. Forward hooks on the blocks still run, so ``edit_hidden`` composes.
    """
    blocks = [model.adapter.block(i) for i in range(layer + 1)]
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for block, original in zip(blocks, saved):
            if original is None:
                del block.forward
            else:
                block.forward = original
