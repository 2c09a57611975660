"""Editor hyperparameters: one documented, validated dataclass per editor, with per-model defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from spectra.errors import SpectraError

#: Model aliases that have per-model defaults (the names ``spectra.models.ALIASES`` gives them).
KNOWN_MODELS: tuple[str, ...] = ("tiny", "gpt2", "gpt2-xl", "gpt-j", "llama3")

#: Shared MEMIT-family values (reference editors.md section 9.1: jianghoucheng/AlphaEdit hparams files).
#: ``tiny`` (6-layer Llama, d_model 192, d_k 768), from measurements on the shipped model (README):
#: - layers 0-2, z at block 2 (``spectra trace``): restoring the subject's last token after blocks 0-2
#:   gives P(true) 0.94-0.95 (clean 0.99, corrupted 0.32), after block 3 0.80, after block 4 0.55,
#:   while the final token recovers from block 4 on. Editing blocks 0-3 instead gave 92 % for 88.6 %
#:   neighbourhood, no better.
#: - clamp 4 ||h0|| and a z step of 5: blocks start with RMSNorm, so z must turn the subject state's
#:   direction, a long way in absolute units (||h0|| at block 2 measures 665 at the subject's last
#:   token, so the clamp allows ||z - h0|| up to ~2,700; one round of 100 edits then writes
#:   ||Delta||_F at 36-62x ||W||_F, see ../shared/reference/editing-regime.md). On the previous model, at the reference's
#:   0.75 / 0.5 the median target NLL stayed at 5 nats and efficacy on 100 edits was 21 %; steps
#:   2 / 3 / 4 gave 88 / 93 / 95 %. On this model 20 iterations at step 5 match 25 at step 4 (MEMIT
#:   93 %, with REVIVE 92 %) in 20 % less time.
#: - lambda 100: at step 4, lambda 10 / 100 kept 85 / 91 % neighbourhood success (efficacy 95 / 94 %).
#: - ridge 1e-3: the key statistics fill few directions (129-396 of 768 above 1e-4 of the largest
#:   eigenvalue) and the plain solve put ||Delta|| at 290x ||W|| for the same efficacy; the ridge cuts
#:   that by an order of magnitude.
#: - two context templates of 6 tokens: a round of 100 edits takes 7-9 s on 2 CPU cores.
_MEMIT_FAMILY: dict[str, dict[str, Any]] = {
    "tiny": dict(
        layers=(0, 1, 2), v_num_grad_steps=20, v_lr=5.0, v_weight_decay=0.5, clamp_norm_factor=4.0,
        kl_factor=0.0625, mom2_update_weight=100.0, ridge=1e-3, mom2_n_samples=6000, max_length=128,
        context_prompts=("the", "it"), context_length=6,
    ),
    # GPT-2 small (12 layers): no official file exists. gpt2-xl's window (layers 13-17 of 48, z at 35 % of the
    # depth, where ROME's causal trace peaks for every GPT-2 size: medium 8/24, large 12/36, xl 17/48) scaled to 12
    # layers is 3-4; the window keeps three layers ending at z = 4. The other values are gpt2-xl's.
    "gpt2": dict(
        layers=(2, 3, 4), v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=0.75,
        kl_factor=0.0625, mom2_update_weight=20000.0, mom2_n_samples=100000, max_length=1024,
    ),
    "gpt2-xl": dict(
        layers=(13, 14, 15, 16, 17), v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5,
        clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=20000.0, mom2_n_samples=100000,
        max_length=1024,
    ),
    "gpt-j": dict(
        layers=(3, 4, 5, 6, 7, 8), v_num_grad_steps=25, v_lr=0.5, v_weight_decay=0.5,
        clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=15000.0, mom2_n_samples=100000,
        max_length=2048,
    ),
    "llama3": dict(
        layers=(4, 5, 6, 7, 8), v_num_grad_steps=25, v_lr=0.1, v_weight_decay=0.5, clamp_norm_factor=0.75,
        kl_factor=0.0625, mom2_update_weight=15000.0, mom2_n_samples=100000, max_length=8192,
    ),
}


def no_defaults(kind: str, model: str) -> SpectraError:
    """The error for a model without per-model defaults: it names the ways to give hyperparameters."""
    return SpectraError(
        f"spectra has no {kind} defaults for the model {model!r} (it has them for {', '.join(KNOWN_MODELS)}, and for "
        "a hub id or directory that resolves to one of those). Give the editor's hyperparameters with --hparams FILE "
        "(EasyEdit's YAML or the official repositories' JSON for that model) and --set key=value, or in Python as "
        "DriftConfig(hparams=...)."
    )


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its help text (read by the CLI and written into run configs)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True, kw_only=True)
class MemitHParams:
    """MEMIT (and everything built on it): layers, z optimisation, keys, covariance weight."""

    #: per-model values merged along the class hierarchy by ``for_model``
    per_model: ClassVar[dict[str, dict[str, Any]]] = _MEMIT_FAMILY

    layers: tuple[int, ...] = _help("Edited layers (MLP down projections), ascending; z lives at the last one.")
    key_position: str = _help(
        "Token whose down-projection input is the key and where z is injected: 'subject_last' "
        "(MEMIT) or 'last' (last prompt token).", "subject_last")
    v_num_grad_steps: int = _help("Maximum Adam iterations of the z optimisation (the last one takes no step).", 25)
    v_lr: float = _help("Adam learning rate of the residual vector delta.", 0.5)
    v_weight_decay: float = _help("Weight of ||delta|| / ||h0||^2 in the z loss (norm not squared, as in MEMIT).", 0.5)
    clamp_norm_factor: float = _help("Trust region: ||delta|| is clamped to this factor times ||h0||.", 0.75)
    kl_factor: float = _help("Weight of KL(p_delta || p_0) at the subject of '{subject} is a'.", 0.0625)
    early_stop_loss: float = _help("Stop a request's z optimisation once its loss is below this.", 5e-2)
    mom2_update_weight: float = _help(
        "lambda: weight of the preserved-key covariance C (C is the mean, so lambda counts pseudo-keys).", 15000.0)
    ridge: float = _help(
        "rho / mean ||k||^2: an extra rho ||Delta||^2 in the solve, for rank-deficient C (0 = the reference).", 0.0)
    mom2_n_samples: int | None = _help("Corpus documents used for C (None: all given).", 100000)
    max_length: int = _help("Tokens per corpus document for C (longer documents are truncated).", 1024)
    batch_size: int = _help("Sequences per forward pass (keys, z, statistics).", 64)
    context_prompts: tuple[str, ...] = _help(
        "Prompts the unedited model continues to make the context templates.",
        ("The", "Therefore", "Because", "I", "You"))
    context_length: int = _help("Tokens per generated context template, prompt included.", 10)
    context_top_k: int = _help("Top-k sampling width for the context templates.", 5)
    seed: int = _help("Seed of the generator that samples the context templates (reference: unseeded).", 0)
    revive_placement: str = _help(
        "Where a REVIVE filter acts on the key side: 'after' (filter the solved update: the paper's post-hoc "
        "form, the default) or 'in_solve' (spectra's extension: solve on the complement of V_k, then filter: "
        "the constrained optimum).", "after")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "context_prompts", tuple(self.context_prompts))
        if not self.layers:
            raise SpectraError("Give at least one edited layer (hyperparameter 'layers').")
        if list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise SpectraError(f"Edited layers must be distinct, non-negative and ascending; got {self.layers}.")
        if self.key_position not in ("subject_last", "last"):
            raise SpectraError(f"key_position must be 'subject_last' or 'last', not {self.key_position!r}.")
        positive = {
            "v_num_grad_steps": self.v_num_grad_steps, "v_lr": self.v_lr, "clamp_norm_factor": self.clamp_norm_factor,
            "mom2_update_weight": self.mom2_update_weight, "max_length": self.max_length,
            "batch_size": self.batch_size, "context_length": self.context_length, "context_top_k": self.context_top_k,
        }
        for name, value in positive.items():
            if not value > 0:
                raise SpectraError(f"Hyperparameter {name} must be positive; got {value}.")
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss", "ridge"):
            if getattr(self, name) < 0:
                raise SpectraError(f"Hyperparameter {name} must be non-negative; got {getattr(self, name)}.")
        if self.mom2_n_samples is not None and self.mom2_n_samples <= 0:
            raise SpectraError(f"mom2_n_samples must be positive or None; got {self.mom2_n_samples}.")
        if not self.context_prompts:
            raise SpectraError("Give at least one context prompt.")
        if self.revive_placement not in ("after", "in_solve"):
            raise SpectraError(f"revive_placement must be 'after' or 'in_solve', not {self.revive_placement!r}.")

    @property
    def z_layer(self) -> int:
        """The layer whose block output carries z (the last edited layer)."""
        return self.layers[-1]

    @classmethod
    def model_defaults(cls, model: str) -> dict[str, Any]:
        """The per-model values of a known model alias, merged along the class hierarchy (base class first)."""
        if model not in KNOWN_MODELS:
            raise no_defaults(cls.__name__, model)
        values: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            values.update(vars(klass).get("per_model", {}).get(model, {}))
        return values

    @classmethod
    def for_model(cls, model: str, **overrides: Any) -> "MemitHParams":
        """The defaults for a known model alias, with ``overrides`` applied (and validated)."""
        values = cls.model_defaults(model)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SpectraError(f"{cls.__name__} has no hyperparameter(s) {', '.join(unknown)}.")
        values.update(overrides)
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able values, for run configs."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True, kw_only=True)
class AlphaEditHParams(MemitHParams):
    """AlphaEdit: MEMIT's z and keys, null-space projected solve with a cross-round key cache."""

    #: tiny: at the reference's 2e-2 the null space at blocks 0 / 1 / 2 is 83 / 578 / 411 of 768
    #: directions and keeps 1 / 24 / 11 % of the edit keys' norm: efficacy on 100 edits 20 %. At 0.5 it
    #: is 405 / 708 / 636 directions; with l2 1 / 1.5 / 3 efficacy is 92 / 92 / 90 %, with REVIVE (in
    #: the solve) 92 / 91 / 87 %, neighbourhood success 86-88 %. Threshold 1 with l2 2: 91 / 86 %.
    per_model: ClassVar[dict[str, dict[str, Any]]] = {
        m: dict(nullspace_threshold=2e-2, l2=10.0) for m in KNOWN_MODELS
    } | {"tiny": dict(nullspace_threshold=0.5, l2=1.5)}

    nullspace_threshold: float = _help(
        "Eigenvalues of the MEAN covariance C below this span the null space P (absolute threshold).", 2e-2)
    l2: float = _help("lambda of AlphaEdit's solve: weight of ||Delta||^2 (the code's L2, not mom2_update_weight).", 10.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_threshold <= 0 or self.l2 <= 0:
            raise SpectraError("nullspace_threshold and l2 must be positive.")

@dataclass(frozen=True, kw_only=True)
class RectHParams(MemitHParams):
    """RECT: MEMIT whose per-layer update keeps only its largest relative changes."""

    keep_percent: float = _help("Percent of entries of each update kept, by |Delta| / (|W| + eps) (AlphaEdit repo: 40).", 40.0)
    eps: float = _help("Added to |W| in the relative change, so zero weights do not divide by zero.", 1e-8)
    mask_schedule: str = _help(
        "'end': solve every layer unmasked, then mask each update once before writing it, keeping "
        "N - int(N (100 - keep_percent) / 100) + 1 entries (the official MEMIT_rect). 'per_layer': mask "
        "each layer's update (round(N keep_percent / 100) entries) before its write, so later layers "
        "absorb what the mask removed.", "end")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.keep_percent <= 100:
            raise SpectraError(f"keep_percent must be in (0, 100]; got {self.keep_percent}.")
        if self.eps < 0:
            raise SpectraError("eps must be non-negative.")
        if self.mask_schedule not in ("end", "per_layer"):
            raise SpectraError(f"mask_schedule must be 'end' or 'per_layer', not {self.mask_schedule!r}.")


@dataclass(frozen=True, kw_only=True)
class PruneHParams(MemitHParams):
    """PRUNE: sequential MEMIT plus a log restraint of the accumulated update's large singular values."""

    log_base: float = _help("alpha of F(s) = log_alpha(s) - log_alpha(s_bar) + s_bar above s_bar = sigma_max(W0).", 2.718281828459045)
    restrain_every_round: bool = _help(
        "Restrain the accumulated update after every round (each round's model is the restrained one); "
        "False: only when finalize() is called, as the reference code does once at the end.", True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.log_base <= 1:
            raise SpectraError(f"log_base must be > 1; got {self.log_base}.")


@dataclass(frozen=True, kw_only=True)
class NseHParams(MemitHParams):
    """NSE: z from the unedited model, neuron selection, residual-norm gated sweeps, key cache."""

    #: tiny: with the tiny clamp (4 ||h0||) and z step (5) the fresh residuals at block 2 measure 127-899
    #: (median 546; ``NseEditor.residual_norms`` on 100 requests): upper_bound 1000 admits every fresh
    #: request and alpha 50 (~10 % of a typical initial residual, the reference's ratio for GPT-J) stops
    #: editing requests that are essentially done.
    per_model: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(alpha=50.0, upper_bound=1000.0, neuron_threshold=1.0),
        "gpt2": dict(mom2_update_weight=10000.0, alpha=35.0, upper_bound=150.0, neuron_threshold=1.0),
        "gpt2-xl": dict(mom2_update_weight=10000.0, alpha=35.0, upper_bound=150.0, neuron_threshold=1.0),
        "gpt-j": dict(alpha=15.0, upper_bound=100.0, neuron_threshold=0.8),
        "llama3": dict(alpha=2.5, upper_bound=50.0, neuron_threshold=1.0),
    }

    alpha: float = _help("A request keeps being edited while its residual norm ||z - h|| exceeds this.", 15.0)
    upper_bound: float = _help("Requests whose residual norm is at least this are not edited (hopeless or broken).", 100.0)
    max_iterations: int = _help("Residual checks per round; at most max_iterations - 1 update sweeps.", 3)
    neuron_threshold: float = _help("Keep the fewest top-scored key neurons whose |K| mass is within this fraction.", 1.0)
    revive_placement: str = _help(
        "'after' only: the update is column-sparse on the selected neurons, where V_k's rows are not "
        "orthonormal, so REVIVE cannot sit inside NSE's solve (reference 12.1).", "after")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha < self.upper_bound:
            raise SpectraError(f"Need 0 <= alpha < upper_bound; got {self.alpha}, {self.upper_bound}.")
        if self.max_iterations < 2:
            raise SpectraError("max_iterations must be at least 2 (one check, one sweep).")
        if not 0 < self.neuron_threshold <= 1:
            raise SpectraError(f"neuron_threshold must be in (0, 1]; got {self.neuron_threshold}.")
        if self.revive_placement != "after":
            raise SpectraError(
                "NSE places a REVIVE filter after its neuron-sparse solve only; use revive_placement='after'."
            )
