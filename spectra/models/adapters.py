"""Architecture adapters: where each site lives in a model, read and written as (out, in).

One small class per family maps the abstract site kinds onto module paths. GPT-2's ``Conv1D``
stores its weight as (in, out); the transpose happens here and nowhere else. GPT-2's fused
``c_attn`` (in, 3*d) is exposed as three sites ``attn.q/k/v``, each a (d, d) slice of it, so that
reading and writing one of them never touches the other two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from spectra.errors import SpectraError
from spectra.models.sites import SITE_KINDS, Site


@dataclass(frozen=True)
class MatrixRef:
    """Where a site's matrix is stored: the module, whether it is stored (in, out), and a slice."""

    module: nn.Module
    transposed: bool
    out_slice: slice | None = None


class Adapter:
    """Base adapter; subclasses name module paths. Never chosen by the model's name."""

    architectures: ClassVar[tuple[str, ...]] = ()
    kinds: ClassVar[tuple[str, ...]] = SITE_KINDS
    #: whether the model is a causal LM whose blocks feed ``final_norm`` and ``unembedding``
    causal: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- structure ------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order; block i's output is the residual stream after layer i."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        """The norm applied to the last block's output before the unembedding."""
        raise NotImplementedError

    def unembedding(self) -> nn.Module:
        """The output projection to vocabulary logits."""
        out = self.model.get_output_embeddings()
        if out is None:
            raise SpectraError("This model has no output embedding; it cannot score text.")
        return out

    def _ref(self, site: Site) -> MatrixRef:
        raise NotImplementedError

    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    def block(self, layer: int) -> nn.Module:
        self._check_layer(layer)
        return self.blocks()[layer]

    def key_module(self, layer: int) -> nn.Module:
        """The module whose *input* is the MEMIT key at ``layer``: the MLP down projection."""
        return self.module(Site(layer, "mlp.down"))

    def module(self, site: Site) -> nn.Module:
        """The module that stores ``site``'s weight."""
        return self._ref(self._checked(site)).module

    def sites(self, kinds: tuple[str, ...] | None = None, layers: list[int] | None = None) -> list[Site]:
        """All sites of the given kinds (default: every kind this family has) and layers."""
        kinds = kinds or self.kinds
        layers = list(range(self.n_layers)) if layers is None else layers
        return [Site(layer, kind) for layer in layers for kind in kinds if kind in self.kinds]

    # -- weights --------------------------------------------------------------------------
    def read(self, site: Site) -> torch.Tensor:
        """A detached copy of the site's weight in (out, in) layout, in the model's dtype."""
        return self.as_site(site, self.module(site).weight.detach()).clone()

    def as_site(self, site: Site, stored: torch.Tensor) -> torch.Tensor:
        """A tensor laid out like the module storing ``site`` (its weight, or a gradient of it) as the site's (out, in) view."""
        ref = self._ref(self._checked(site))
        logical = stored.T if ref.transposed else stored
        return logical if ref.out_slice is None else logical[ref.out_slice]

    def write(self, site: Site, value: torch.Tensor) -> None:
        """Replace the site's weight by ``value`` given in (out, in) layout (cast to the model's dtype)."""
        ref = self._ref(self._checked(site))
        expected = self.shape(site)
        if tuple(value.shape) != expected:
            raise SpectraError(
                f"Cannot write a matrix of shape {tuple(value.shape)} into {site}, whose (out, in) "
                f"shape is {expected}."
            )
        if not torch.isfinite(value).all():
            raise SpectraError(f"Refusing to write non-finite values (NaN or inf) into {site}.")
        weight = ref.module.weight
        with torch.no_grad():
            target = weight.T if ref.transposed else weight
            if ref.out_slice is not None:
                target = target[ref.out_slice]
            target.copy_(value.to(device=weight.device, dtype=weight.dtype))

    def shape(self, site: Site) -> tuple[int, int]:
        """The (out, in) shape of a site."""
        ref = self._ref(self._checked(site))
        out_dim, in_dim = ref.module.weight.shape
        if ref.transposed:
            out_dim, in_dim = in_dim, out_dim
        if ref.out_slice is not None:
            out_dim = len(range(*ref.out_slice.indices(out_dim)))
        return out_dim, in_dim

    # -- hidden states --------------------------------------------------------------------
    @staticmethod
    def hidden_of(block_output: Any) -> torch.Tensor:
        """The hidden-state tensor of a block's output (a bare tensor or a tuple, by version)."""
        return block_output if isinstance(block_output, torch.Tensor) else block_output[0]

    @staticmethod
    def with_hidden(block_output: Any, hidden: torch.Tensor) -> Any:
        """The block output with its hidden states replaced, keeping its original form."""
        if isinstance(block_output, torch.Tensor):
            return hidden
        return (hidden, *block_output[1:])

    # -- checks ---------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise SpectraError(f"Layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}.")

    def _checked(self, site: Site) -> Site:
        self._check_layer(site.layer)
        if site.kind not in self.kinds:
            raise SpectraError(f"{type(self).__name__} has no {site.kind!r} site; it has {', '.join(self.kinds)}.")
        return site


class _NamedPathsAdapter(Adapter):
    """Families whose sites are plain ``block.<parent>.<child>`` nn.Linear modules, named in ``paths``."""

    base_attribute: ClassVar[str] = ""
    blocks_attribute: ClassVar[str] = ""
    norm_attribute: ClassVar[str] = ""
    paths: ClassVar[dict[str, tuple[str, str]]] = {}

    def _base(self) -> nn.Module:
        return getattr(self.model, self.base_attribute, self.model)

    def blocks(self) -> nn.ModuleList:
        return getattr(self._base(), self.blocks_attribute)

    def final_norm(self) -> nn.Module:
        return getattr(self._base(), self.norm_attribute)

    def _ref(self, site: Site) -> MatrixRef:
        parent, child = self.paths[site.kind]
        return MatrixRef(getattr(getattr(self.blocks()[site.layer], parent), child), transposed=False)


class LlamaAdapter(_NamedPathsAdapter):
    """Llama, Mistral, Qwen2: gate/up/down FFN and separate q/k/v/o projections, all nn.Linear."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "LlamaModel")
    base_attribute, blocks_attribute, norm_attribute = "model", "layers", "norm"
    paths = {
        "mlp.up": ("mlp", "up_proj"), "mlp.gate": ("mlp", "gate_proj"), "mlp.down": ("mlp", "down_proj"),
        "attn.q": ("self_attn", "q_proj"), "attn.k": ("self_attn", "k_proj"),
        "attn.v": ("self_attn", "v_proj"), "attn.o": ("self_attn", "o_proj"),
    }


class GPT2Adapter(Adapter):
    """GPT-2: Conv1D weights stored (in, out) and a fused c_attn split into q/k/v slices."""

    architectures = ("GPT2LMHeadModel", "GPT2Model")
    kinds = ("mlp.up", "mlp.down", "attn.q", "attn.k", "attn.v", "attn.o")

    def _base(self) -> nn.Module:
        return getattr(self.model, "transformer", self.model)

    def blocks(self) -> nn.ModuleList:
        return self._base().h

    def final_norm(self) -> nn.Module:
        return self._base().ln_f

    def _ref(self, site: Site) -> MatrixRef:
        block = self.blocks()[site.layer]
        if site.kind == "mlp.up":
            return MatrixRef(block.mlp.c_fc, transposed=True)
        if site.kind == "mlp.down":
            return MatrixRef(block.mlp.c_proj, transposed=True)
        if site.kind == "attn.o":
            return MatrixRef(block.attn.c_proj, transposed=True)
        width = block.attn.c_attn.weight.shape[1] // 3
        index = ("attn.q", "attn.k", "attn.v").index(site.kind)
        return MatrixRef(block.attn.c_attn, transposed=True, out_slice=slice(index * width, (index + 1) * width))


class GPTJAdapter(_NamedPathsAdapter):
    """GPT-J: fc_in/fc_out FFN (nn.Linear) and q/k/v/out projections; attention and MLP in parallel."""

    architectures = ("GPTJForCausalLM", "GPTJModel")
    kinds = ("mlp.up", "mlp.down", "attn.q", "attn.k", "attn.v", "attn.o")
    base_attribute, blocks_attribute, norm_attribute = "transformer", "h", "ln_f"
    paths = {
        "mlp.up": ("mlp", "fc_in"), "mlp.down": ("mlp", "fc_out"),
        "attn.q": ("attn", "q_proj"), "attn.k": ("attn", "k_proj"),
        "attn.v": ("attn", "v_proj"), "attn.o": ("attn", "out_proj"),
    }


class BertAdapter(Adapter):
    """BERT (encoder): intermediate/output dense FFN and query/key/value/output attention."""

    architectures = ("BertForMaskedLM", "BertModel", "BertForSequenceClassification", "BertForPreTraining")
    kinds = ("mlp.up", "mlp.down", "attn.q", "attn.k", "attn.v", "attn.o")
    causal = False

    def _base(self) -> nn.Module:
        return getattr(self.model, "bert", self.model)

    def blocks(self) -> nn.ModuleList:
        return self._base().encoder.layer

    def final_norm(self) -> nn.Module:
        raise SpectraError("BERT applies its norms inside each layer; it has no final norm before an unembedding.")

    def _ref(self, site: Site) -> MatrixRef:
        block = self.blocks()[site.layer]
        modules = {
            "mlp.up": block.intermediate.dense, "mlp.down": block.output.dense,
            "attn.q": block.attention.self.query, "attn.k": block.attention.self.key,
            "attn.v": block.attention.self.value, "attn.o": block.attention.output.dense,
        }
        return MatrixRef(modules[site.kind], transposed=False)


ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, GPT2Adapter, GPTJAdapter, BertAdapter)


def adapter_for(model: nn.Module) -> Adapter:
    """Choose the adapter from ``config.architectures`` or, failing that, the model's class name."""
    config = getattr(model, "config", None)
    declared = list(getattr(config, "architectures", None) or [])
    for name in [type(model).__name__, *declared]:
        for adapter_cls in ADAPTERS:
            if name in adapter_cls.architectures:
                return adapter_cls(model)
    supported = sorted(a for cls in ADAPTERS for a in cls.architectures)
    raise SpectraError(
        f"spectra has no adapter for the architecture {type(model).__name__} "
        f"(config.architectures = {declared}). Supported: {', '.join(supported)}. Adding one is a small "
        "class in spectra/models/adapters.py that names the module paths of each site."
    )
