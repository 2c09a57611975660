"""Shared MEMIT-family machinery: context templates, prompt rows, keys, residual targets z."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from spectra.data.records import EditRequest
from spectra.models.hooks import (
    StopForward, capture_hidden, capture_inputs, edit_hidden, record_block_output, replay_blocks, stop_after,
)
from spectra.errors import SpectraError
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.models.tokens import continuation_ids, encode, pad_right, subject_last_index

logger = logging.getLogger(__name__)

#: The prompt whose next-token distribution after the subject the KL term keeps in place.
KL_TEMPLATE = "{} is a"


def generate_templates(
    model: LoadedModel, prompts: Sequence[str], length: int, top_k: int, generator: torch.Generator
) -> list[str]:
    """Context templates ``["{}", "<sample>. {}", ...]`` sampled from the model (top-k, one per prompt).

    Sampled with the caller's generator (the reference leaves this unseeded, so REVIVE on/off arms
    would differ by template noise). Special tokens are skipped when decoding, which avoids the
    reference's doubled BOS for Llama-3; braces are blanked so the template formats safely.
    """
    tokenizer = model.tokenizer
    templates = ["{}"]
    for prompt in prompts:
        ids = encode(tokenizer, prompt)
        with torch.no_grad():
            while len(ids) < length:
                logits = model.model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits
                top = logits[0, -1].float().cpu().topk(min(top_k, logits.shape[-1]))
                pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
                ids.append(int(top.indices[pick]))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = text.replace("\n\n", " ").replace("{", " ").replace("}", " ").strip()
        templates.append(f"{text}. {{}}")
    return templates


def template_weights(templates: Sequence[str]) -> list[float]:
    """Weights that average keys as 1/2 bare prompt + 1/2 mean of the context templates (MEMIT)."""
    if templates[0] != "{}":
        raise SpectraError("The first context template must be the bare '{}'.")
    rest = len(templates) - 1
    return [1.0] if rest == 0 else [0.5] + [0.5 / rest] * rest


def check_request(request: EditRequest) -> None:
    """A request's prompt must hold exactly one '{}' and its subject and target must be non-empty."""
    if request.prompt.count("{}") != 1:
        raise SpectraError(
            f"Edit request {request.case_id}: the prompt {request.prompt!r} must contain the subject "
            f"placeholder '{{}}' exactly once (subject {request.subject!r} not found)."
        )
    if not request.subject.strip() or not request.target_new.strip():
        raise SpectraError(f"Edit request {request.case_id} has an empty subject or target.")


def lookup_index(model: LoadedModel, template: str, subject: str, key_position: str) -> int:
    """Position of the key / injected delta in ``template.format(subject)``: subject's last token, or last."""
    n_tokens = len(encode(model.tokenizer, template.format(subject)))
    if key_position == "last":
        return n_tokens - 1
    index = subject_last_index(model.tokenizer, template, subject)
    if not 0 <= index < n_tokens:
        raise SpectraError(f"The subject {subject!r} could not be located in {template.format(subject)!r}.")
    return index


@dataclass
class PromptRows:
    """Token rows fed to the model, each with its lookup position and the request it belongs to."""

    ids: list[list[int]]
    lookup: list[int]
    owner: list[int]
    weight: list[float]

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, max_rows: int) -> list[list[int]]:
        """Row indices in chunks of at most ``max_rows``, never splitting one request's rows."""
        return chunk_by_owner(self.owner, max_rows)

    def subset(self, owners: Sequence[int]) -> "PromptRows":
        """The rows of the given requests, renumbered 0..len(owners)-1 in the given order."""
        new_index = {owner: i for i, owner in enumerate(owners)}
        keep = [r for r in range(len(self.ids)) if self.owner[r] in new_index]
        return PromptRows(
            [self.ids[r] for r in keep], [self.lookup[r] for r in keep],
            [new_index[self.owner[r]] for r in keep], [self.weight[r] for r in keep],
        )


def chunk_by_owner(owners: Sequence[int], max_rows: int) -> list[list[int]]:
    """Indices into ``owners`` grouped in chunks of at most ``max_rows`` (more if one request has more rows).

    A request's rows stay in one chunk, so its loss (a mean over its rows) is computed in one pass.
    """
    by_owner: dict[int, list[int]] = {}
    for index, owner in enumerate(owners):
        by_owner.setdefault(owner, []).append(index)
    chunks: list[list[int]] = []
    current: list[int] = []
    for indices in by_owner.values():
        if current and len(current) + len(indices) > max_rows:
            chunks.append(current)
            current = []
        current = current + indices
    if current:
        chunks.append(current)
    return chunks


def key_rows(model: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str], key_position: str) -> PromptRows:
    """Every request in every template (bare one first), weighted for the MEMIT key average."""
    weights = template_weights(templates)
    rows = PromptRows([], [], [], [])
    for owner, request in enumerate(requests):
        check_request(request)
        for template, weight in zip(templates, weights):
            filled = template.format(request.prompt)
            rows.ids.append(encode(model.tokenizer, filled.format(request.subject)))
            rows.lookup.append(lookup_index(model, filled, request.subject, key_position))
            rows.owner.append(owner)
            rows.weight.append(weight)
    return rows


def _forward(model: LoadedModel, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch tensors on the model's device (positions come from row lengths)."""
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    batch = pad_right(ids, pad).to(model.device)
    return batch.input_ids, batch.attention_mask


def keys_and_hidden(
    model: LoadedModel, rows: PromptRows, layers: Sequence[int], hidden_layer: int | None, batch_size: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys (d_k, n) per layer, averaged over templates, and block ``hidden_layer``'s output (d, n).

    Both come from one forward pass, stopped after the deepest block needed; the hidden state is
    read at the lookup position of each request's bare prompt (its first row). Everything is
    returned in float32 whatever the model's dtype. ``hidden_layer=None`` skips the hidden state.
    """
    n = max(rows.owner) + 1
    device = model.device
    keys: dict[int, torch.Tensor] = {}
    hidden: torch.Tensor | None = None
    first_row = {owner: rows.owner.index(owner) for owner in range(n)}
    deepest = max([*layers] + ([] if hidden_layer is None else [hidden_layer]))
    for chunk in rows.chunks(batch_size):
        input_ids, mask = _forward(model, [rows.ids[r] for r in chunk])
        at = torch.arange(len(chunk), device=device)
        pos = torch.tensor([rows.lookup[r] for r in chunk], device=device)
        with ExitStack() as stack:
            inputs = stack.enter_context(capture_inputs(model, layers))
            outputs = stack.enter_context(capture_hidden(model, hidden_layer)) if hidden_layer is not None else {}
            stack.enter_context(stop_after(model, deepest))
            stack.enter_context(torch.no_grad())
            try:
                model.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
        owners = torch.tensor([rows.owner[r] for r in chunk], device=device)
        weight = torch.tensor([rows.weight[r] for r in chunk], device=device, dtype=torch.float32)
        for layer in layers:
            picked = inputs[layer][at, pos].float() * weight[:, None]
            if layer not in keys:
                keys[layer] = torch.zeros(n, picked.shape[1], device=device)
            keys[layer].index_add_(0, owners, picked)
        if hidden_layer is not None:
            state = outputs[hidden_layer][at, pos].float()
            if hidden is None:
                hidden = torch.zeros(n, state.shape[1], device=device)
            bare = torch.tensor([i for i, r in enumerate(chunk) if first_row[rows.owner[r]] == r], device=device)
            hidden[owners[bare]] = state[bare]
    return {layer: k.T.contiguous() for layer, k in keys.items()}, None if hidden is None else hidden.T.contiguous()


@dataclass
class _ZRows:
    """The z-optimisation batch: rewriting rows (template + target prefix) and one KL row per request."""

    ids: list[list[int]]
    lookup: list[int]
    owner: list[int]
    is_kl: list[bool]
    target_pos: list[list[int]]
    target_ids: list[list[int]]
    is_bare: list[bool]


def _z_rows(model: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str], key_position: str) -> _ZRows:
    """Per request: every template filled with the prompt plus the target minus its last token, then the KL prompt."""
    rows = _ZRows([], [], [], [], [], [], [])
    for owner, request in enumerate(requests):
        check_request(request)
        for t, template in enumerate(templates):
            filled = template.format(request.prompt)
            prefix, target = continuation_ids(model.tokenizer, filled.format(request.subject), request.target_new)
            if not target:
                raise SpectraError(f"Edit request {request.case_id}: the target {request.target_new!r} has no tokens.")
            rows.ids.append(prefix + target[:-1])
            rows.lookup.append(lookup_index(model, filled, request.subject, key_position))
            rows.owner.append(owner)
            rows.is_kl.append(False)
            # Position p predicts token p + 1: the target's j-th token is predicted at len(prefix) - 1 + j.
            rows.target_pos.append([len(prefix) - 1 + j for j in range(len(target))])
            rows.target_ids.append(target)
            rows.is_bare.append(t == 0)
        rows.ids.append(encode(model.tokenizer, KL_TEMPLATE.format(request.subject)))
        rows.lookup.append(lookup_index(model, KL_TEMPLATE, request.subject, key_position))
        rows.owner.append(owner)
        rows.is_kl.append(True)
        rows.target_pos.append([])
        rows.target_ids.append([])
        rows.is_bare.append(False)
    return rows


class _LowerStates:
    """Block ``layer``'s output for every z row, recorded in the first step and replayed after it.

    Nothing up to the z layer depends on delta, so from the second step on blocks 0..layer need not
    run (on the tiny model that is half the forward pass). Rows are right-padded, so each row's
    states at its own positions do not depend on the batch it was computed in.
    """

    def __init__(self, model: LoadedModel, layer: int) -> None:
        self.model = model
        self.layer = layer
        self.states: dict[int, torch.Tensor] = {}
        self.template: object = None

    def record(self, chunk: list[int], lengths: list[int], output: object) -> None:
        """Keep each row's states (its real positions only) and one output as the form to rebuild."""
        hidden = self.model.adapter.hidden_of(output).detach()
        for i, r in enumerate(chunk):
            self.states[r] = hidden[i, : lengths[i]]
        self.template = output

    def output_for(self, chunk: list[int], width: int) -> object:
        """Block ``layer``'s output for a right-padded batch of ``chunk`` (zeros at padding)."""
        first = self.states[chunk[0]]
        hidden = first.new_zeros(len(chunk), width, first.shape[-1])
        for i, r in enumerate(chunk):
            hidden[i, : len(self.states[r])] = self.states[r]
        return self.model.adapter.with_hidden(self.template, hidden)


@dataclass(frozen=True)
class ZSettings:
    """The z-optimisation knobs (a view of the MEMIT hyperparameters)."""

    layer: int
    key_position: str
    steps: int
    lr: float
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    early_stop_loss: float
    batch_size: int


def optimize_targets(
    model: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str], settings: ZSettings,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Target hidden states z (d, n): block ``settings.layer``'s output at the lookup position, pushed to say the target.

    All requests of a round are optimised jointly, one delta row each. The loss is a sum of
    independent per-request losses and Adam acts elementwise, so this is exactly n separate
    optimisations (same steps, same early stops: a finished request's row is frozen and its rows
    leave the batch), at the cost of a few batched forward passes instead of n small ones.
    Requests are processed in chunks of at most ``batch_size`` sequences, accumulating gradients.
    ``on_step(1)`` is called after every step (a progress display).
    """
    rows = _z_rows(model, requests, templates, settings.key_position)
    n = len(requests)
    d_model = model.adapter.shape(Site(settings.layer, "mlp.down"))[0]
    delta = torch.zeros(n, d_model, device=model.device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.lr)
    h0 = torch.zeros(n, d_model, device=model.device)
    p0: dict[int, torch.Tensor] = {}
    active = set(range(n))
    losses = torch.zeros(n)
    lower = _LowerStates(model, settings.layer)
    for step in range(settings.steps):
        optimizer.zero_grad()
        subset = [r for r in range(len(rows.ids)) if rows.owner[r] in active]
        finished: set[int] = set()
        for indices in chunk_by_owner([rows.owner[r] for r in subset], settings.batch_size):
            chunk = [subset[i] for i in indices]
            per_request = _z_loss(model, rows, chunk, delta, h0, p0, settings, lower, first=step == 0)
            for owner, value in per_request.items():
                losses[owner] = float(value.detach())
            done = {o for o in per_request if losses[o] < settings.early_stop_loss}
            finished |= done
            pending = [value for owner, value in per_request.items() if owner not in done]
            if pending and step < settings.steps - 1:
                torch.stack(pending).sum().backward()
        active -= finished
        if on_step is not None:
            on_step(1)
        if not active or step == settings.steps - 1:
            break
        # Finished requests keep their delta: Adam's momentum would otherwise still move them.
        done_rows = [o for o in range(n) if o not in active]
        frozen = delta.detach()[done_rows].clone()
        optimizer.step()
        with torch.no_grad():
            delta[done_rows] = frozen
            # Trust region: ||delta|| <= clamp * ||h0|| per request.
            limit = settings.clamp_norm_factor * h0.norm(dim=1)
            norms = delta.norm(dim=1)
            scale = torch.where(norms > limit, limit / norms.clamp_min(1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
    logger.debug("z losses after optimisation: %s", losses.tolist())
    return (h0 + delta.detach()).T.contiguous()


def logits_at(model: LoadedModel, input_ids: torch.Tensor, mask: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Logits (sum of len(positions[i]), vocab) at the given positions of each row, in row order.

    The LM head runs on the base model's last hidden states at those positions only: a full
    (batch, length, vocab) logit tensor costs more than the blocks on a small model and gigabytes
    on a 128k-vocabulary one. The families spectra adapts all have a plain linear head.
    """
    hidden = model.model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    rows = torch.tensor([i for i, row in enumerate(positions) for _ in row], device=hidden.device)
    columns = torch.tensor([p for row in positions for p in row], device=hidden.device)
    return model.model.get_output_embeddings()(hidden[rows, columns])


def _z_loss(
    model: LoadedModel, rows: _ZRows, chunk: list[int], delta: torch.Tensor, h0: torch.Tensor,
    p0: dict[int, torch.Tensor], settings: ZSettings, lower: _LowerStates, first: bool,
) -> dict[int, torch.Tensor]:
    """Per-request loss NLL + kl_factor * KL + weight_decay * ||delta|| / ||h0||^2 for the chunk's rows.

    The first step runs the whole model and records the z layer's states; later steps replay them.
    """
    device = model.device
    input_ids, mask = _forward(model, [rows.ids[r] for r in chunk])
    at = torch.arange(len(chunk), device=device)
    pos = torch.tensor([rows.lookup[r] for r in chunk], device=device)
    owners = torch.tensor([rows.owner[r] for r in chunk], device=device)
    bare = torch.tensor([i for i, r in enumerate(chunk) if rows.is_bare[r]], dtype=torch.long, device=device)

    def add_delta(hidden: torch.Tensor) -> torch.Tensor:
        # The z layer may live on another device than the first one (--device-map): index it where it is.
        rows, cols, kept = at.to(hidden.device), pos.to(hidden.device), bare.to(hidden.device)
        if first:
            h0[owners[bare]] = hidden[rows[kept], cols[kept]].detach().float().to(h0.device)
        hidden = hidden.clone()
        hidden[rows, cols] = hidden[rows, cols] + delta[owners].to(hidden.device, hidden.dtype)
        return hidden

    with ExitStack() as stack:
        if first:
            recorded = stack.enter_context(record_block_output(model, settings.layer))
        else:
            stack.enter_context(replay_blocks(model, settings.layer, lower.output_for(chunk, input_ids.shape[1])))
        stack.enter_context(edit_hidden(model, settings.layer, add_delta))
        # The KL row is read at its lookup position, a rewriting row where it predicts the target.
        read = [[rows.lookup[r]] if rows.is_kl[r] else rows.target_pos[r] for r in chunk]
        log_probs = torch.log_softmax(logits_at(model, input_ids, mask, read).float(), dim=-1)
    if first:
        lower.record(chunk, [len(rows.ids[r]) for r in chunk], recorded[0])

    result: dict[int, torch.Tensor] = {}
    nll_sum: dict[int, list[torch.Tensor]] = {}
    start = 0
    for r, positions in zip(chunk, read):
        owner = rows.owner[r]
        span = log_probs[start : start + len(positions)]
        start += len(positions)
        if rows.is_kl[r]:
            current = span[0]
            if first:
                p0[owner] = current.detach()
            kl = torch.sum(current.exp() * (current - p0[owner]))
            result[owner] = result.get(owner, 0.0) + settings.kl_factor * kl
        else:
            tids = torch.tensor(rows.target_ids[r], device=device)
            nll_sum.setdefault(owner, []).append(-span.gather(1, tids[:, None]).mean())
    for owner, parts in nll_sum.items():
        decay = settings.weight_decay * delta[owner].norm() / h0[owner].norm().clamp_min(1e-12) ** 2
        result[owner] = result.get(owner, 0.0) + torch.stack(parts).mean() + decay
    return result
