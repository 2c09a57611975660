"""Gradients of a general-task loss with respect to weight matrices: what the ``fisher`` protection criterion ranks by."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from spectra.data.records import MultipleChoiceItem
from spectra.errors import SpectraError
from spectra.evaluation.scoring import encode_pairs, pad_id_of
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.models.tokens import pad_right


def general_loss_gradients(
    model: LoadedModel, items: Sequence[MultipleChoiceItem], sites: Sequence[Site], batch_size: int = 16,
) -> Iterator[dict[Site, torch.Tensor]]:
    """Per mini-batch of ``batch_size`` items: the gradient, per site, of the mean NLL of the items' gold answers.

    The loss of one item is the mean per-token NLL of " " + its gold choice after its prompt (the
    same teacher-forced score the general-ability probe compares), averaged over the batch. Each
    gradient is float32 in the site's (out, in) layout, on the CPU. The weights' ``requires_grad``
    flags are restored afterwards and no ``.grad`` is left behind (``torch.autograd.grad``).
    """
    if not items:
        raise SpectraError("The general-task gradients need at least one item.")
    if batch_size < 1:
        raise SpectraError(f"The mini-batch size must be at least 1, got {batch_size}.")
    pairs = encode_pairs(model.tokenizer, [(item.prompt, item.choices[item.gold]) for item in items])
    modules = {site: model.adapter.module(site) for site in sites}
    weights = list({id(m.weight): m.weight for m in modules.values()}.values())  # q/k/v may share one (GPT-2)
    flags = [w.requires_grad for w in weights]
    pad = pad_id_of(model.tokenizer)
    try:
        for w in weights:
            w.requires_grad_(True)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = pad_right([list(prefix) + list(answer[:-1]) for prefix, answer in chunk], pad).to(model.device)
            logits = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            losses = []
            for row, (prefix, answer) in enumerate(chunk):
                positions = torch.arange(len(prefix) - 1, len(prefix) + len(answer) - 1, device=logits.device)
                log_probs = torch.log_softmax(logits[row, positions].float(), dim=-1)
                target = torch.tensor(answer, device=logits.device)
                losses.append(-log_probs.gather(1, target[:, None]).mean())
            grads = torch.autograd.grad(torch.stack(losses).mean(), weights)
            by_weight = {id(w): g for w, g in zip(weights, grads)}
            yield {site: model.adapter.as_site(site, by_weight[id(module.weight)]).detach().float().cpu()
                   for site, module in modules.items()}
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
