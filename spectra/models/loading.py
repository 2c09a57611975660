"""Loading models by alias, local path or hub id — offline unless the user allows downloads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spectra.assets import tiny_model_dir
from spectra.errors import SpectraError
from spectra.models.adapters import Adapter, adapter_for

#: Aliases users type, and what they resolve to. ``tiny`` ships inside the package.
ALIASES: dict[str, str] = {
    "tiny": "spectra:assets/tiny",
    "gpt2": "openai-community/gpt2",
    "gpt2-xl": "openai-community/gpt2-xl",
    "gpt-j": "EleutherAI/gpt-j-6B",
    "llama3": "meta-llama/Meta-Llama-3-8B-Instruct",
}

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model with its tokenizer and adapter, plus the provenance results record."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    name: str
    source: str
    revision: str = "local"
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU; anything else must be a valid torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise SpectraError(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SpectraError(f"Device {device!r} was asked for, but this machine has no CUDA GPU: use --device cpu.")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map a dtype name to torch; unknown names are a clear error."""
    if dtype not in DTYPES:
        raise SpectraError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def resolve_source(name: str) -> str:
    """The alias's target, a local directory, or a hub id (returned unchanged)."""
    if name in ALIASES:
        target = ALIASES[name]
        return str(tiny_model_dir()) if target.startswith("spectra:") else target
    return name


def locally_available(name: str) -> tuple[bool, str]:
    """Whether a model can be loaded without network, and from where."""
    source = resolve_source(name)
    if Path(source).is_dir():
        return (Path(source, "config.json").is_file(), source)
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(source, local_files_only=True, allow_patterns=["config.json"])
        return (True, path)
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return (False, source)


def load_model(
    name: str = "tiny", device: str = "auto", dtype: str = "float32", allow_download: bool = False
) -> LoadedModel:
    """Load a causal LM (or BERT) with its tokenizer and adapter, from the local cache by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    source = resolve_source(name)
    looks_local = Path(source).exists() or source.startswith((".", "/", "~"))
    if looks_local and not Path(source, "config.json").is_file():
        raise SpectraError(
            f"The model directory {source!r} does not exist or has no config.json. Give a directory "
            "saved with save_pretrained, an alias (spectra models lists them) or a hub id."
        )
    offline = not allow_download
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=offline)
    except OSError as err:
        raise SpectraError(
            f"The model {name!r} ({source}) is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}). Download it once with "
            f"`huggingface-cli download {source}` on a machine with network access (gated models such as "
            "Llama 3 need an accepted licence and a token), point --model at a local directory, or pass "
            "--allow-download to let spectra fetch it."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch_device).eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter_for(model),
        name=name,
        source=source,
        revision=str(getattr(model.config, "_commit_hash", None) or "local"),
    )
