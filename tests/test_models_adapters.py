"""Adapters read and write every site as (out, in): W @ x is what the module computes."""

from __future__ import annotations

import pytest
import torch

from spectra.errors import SpectraError
from spectra.models import Site, adapter_for
from spectra.models.adapters import GPT2Adapter

from conftest import make_tiny_model


def _site_input_output(model, adapter, site, x):
    """Feed ``x`` into the site's module directly and return the part of its output that is the site's."""
    module = adapter.module(site)
    out = module(x)
    ref = adapter._ref(site)
    if ref.out_slice is not None:
        out = out[..., ref.out_slice]
    return out


def test_adapter_is_chosen_by_architecture(tiny_model):
    adapter = adapter_for(tiny_model)
    assert adapter.n_layers == 3
    assert type(adapter).__name__.lower().startswith(
        {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2", "GPTJForCausalLM": "gptj", "BertForMaskedLM": "bert"}[
            type(tiny_model).__name__])


def test_write_plus_delta_changes_module_output_by_delta_x(tiny_model):
    """Writing W + D into a site changes that module's output by exactly D @ x."""
    adapter = adapter_for(tiny_model)
    generator = torch.Generator().manual_seed(0)
    for site in adapter.sites(layers=[1]):
        out_dim, in_dim = adapter.shape(site)
        x = torch.randn(5, in_dim, generator=generator)
        before = _site_input_output(tiny_model, adapter, site, x)
        W = adapter.read(site)
        D = torch.randn(out_dim, in_dim, generator=generator) * 0.1
        adapter.write(site, W + D)
        after = _site_input_output(tiny_model, adapter, site, x)
        torch.testing.assert_close(after - before, x @ D.T, atol=1e-5, rtol=1e-4, msg=f"site {site}")
        torch.testing.assert_close(adapter.read(site), W + D, msg=f"read-after-write at {site}")


def test_writing_a_site_changes_the_model_output_and_only_that_site(tiny_model):
    adapter = adapter_for(tiny_model)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        before = tiny_model(input_ids=ids).logits
        site = Site(1, "mlp.down")
        others = {s: adapter.read(s) for s in adapter.sites() if s != site}
        adapter.write(site, adapter.read(site) + 0.5)
        after = tiny_model(input_ids=ids).logits
    assert not torch.allclose(before, after)
    for other, value in others.items():
        assert torch.equal(adapter.read(other), value), f"{other} changed when writing {site}"


def test_gpt2_fused_attention_slices_are_independent():
    model = make_tiny_model("gpt2")
    adapter = adapter_for(model)
    assert isinstance(adapter, GPT2Adapter)
    q, k, v = (adapter.read(Site(0, kind)) for kind in ("attn.q", "attn.k", "attn.v"))
    fused = model.transformer.h[0].attn.c_attn.weight.detach()  # stored (in, 3 * d)
    torch.testing.assert_close(torch.cat([q, k, v], dim=0), fused.T)
    adapter.write(Site(0, "attn.k"), torch.zeros_like(k))
    assert torch.equal(adapter.read(Site(0, "attn.q")), q)
    assert torch.equal(adapter.read(Site(0, "attn.v")), v)
    assert torch.count_nonzero(adapter.read(Site(0, "attn.k"))) == 0


def test_bad_sites_and_values_are_clear_errors():
    adapter = adapter_for(make_tiny_model("llama"))
    with pytest.raises(SpectraError, match="out of range"):
        adapter.read(Site(7, "mlp.down"))
    with pytest.raises(SpectraError, match="shape"):
        adapter.write(Site(0, "mlp.down"), torch.zeros(3, 3))
    bad = adapter.read(Site(0, "mlp.down"))
    bad[0, 0] = float("nan")
    with pytest.raises(SpectraError, match="non-finite"):
        adapter.write(Site(0, "mlp.down"), bad)
    with pytest.raises(SpectraError, match="Unknown site kind"):
        Site(0, "mlp.sideways")
    with pytest.raises(SpectraError, match="no 'mlp.gate'"):
        adapter_for(make_tiny_model("gpt2")).read(Site(0, "mlp.gate"))


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(SpectraError, match="no adapter"):
        adapter_for(torch.nn.Linear(3, 3))


def test_parse_sites_expands_kinds_and_checks_layers():
    from spectra.models import parse_sites

    kinds = ("mlp.up", "mlp.down")
    assert parse_sites("mlp.down", 3, kinds) == [Site(0, "mlp.down"), Site(1, "mlp.down"), Site(2, "mlp.down")]
    assert parse_sites("mlp.up@2, mlp.down@0", 3, kinds) == [Site(0, "mlp.down"), Site(2, "mlp.up")]
    with pytest.raises(SpectraError, match="out of range"):
        parse_sites("mlp.down@3", 3, kinds)
