"""Loading models by alias, local path or hub id — offline unless the user allows downloads."""

from __future__ import annotations

import json
import os
import re
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

#: ``--dtype auto``: the dtype the checkpoint was saved in (transformers reads it from the weights or config.json).
AUTO_DTYPE = "auto"


@dataclass(frozen=True)
class ModelSize:
    """What a model needs: its parameter count and the dtype its published checkpoint is stored in."""

    parameters: float
    checkpoint_dtype: str

    def describe(self) -> str:
        """Disk and memory needs in words, per dtype spectra can load it in."""
        def gb(bytes_per_parameter: int) -> str:
            return f"{self.parameters * bytes_per_parameter / 1e9:.1f} GB"

        disk = gb(4 if self.checkpoint_dtype == "float32" else 2)
        return (f"{self.parameters / 1e9:.2f} B parameters: about {disk} on disk ({self.checkpoint_dtype} checkpoint); "
                f"in memory {gb(4)} as float32, {gb(2)} as float16 or bfloat16 (--dtype), plus activations and the key "
                "statistics of the edited layers")


#: Sizes of the aliased models (parameter counts from their model cards).
MODEL_SIZES: dict[str, ModelSize] = {
    "gpt2": ModelSize(124e6, "float32"),
    "gpt2-xl": ModelSize(1.56e9, "float32"),
    "gpt-j": ModelSize(6.05e9, "float32"),
    "llama3": ModelSize(8.03e9, "bfloat16"),
}


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


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """Map a dtype name to torch (``auto`` stays "auto": the checkpoint's own dtype); unknown names are a clear error."""
    if dtype == AUTO_DTYPE:
        return AUTO_DTYPE
    if dtype not in DTYPES:
        raise SpectraError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)} or auto (the checkpoint's dtype).")
    return DTYPES[dtype]


def check_device_map(device_map: str | None) -> None:
    """``--device-map`` spreads a model over the available devices through accelerate, an optional dependency."""
    if device_map is None:
        return
    from importlib.util import find_spec

    if find_spec("accelerate") is None:
        raise SpectraError(
            f"--device-map {device_map} places the model's layers over several devices through the accelerate "
            "package, which is not installed (it is optional). Install it with `pip install 'spectra[large]'` (or "
            "`pip install accelerate`), or leave --device-map out to load the model on one --device."
        )


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


#: Files that hold a model's weights; one of them must be in a local model directory.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: Files that define a tokenizer; one of them must be in a local model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")

#: Site kinds in words, for messages about a model's parameters.
KIND_WORDS = {
    "mlp.up": "FFN up projection", "mlp.gate": "FFN gate projection", "mlp.down": "FFN down projection",
    "attn.q": "attention query projection", "attn.k": "attention key projection",
    "attn.v": "attention value projection", "attn.o": "attention output projection",
}


def check_model_source(name: str) -> None:
    """Check a local model directory before anything loads: config.json, a tokenizer, weights, intact safetensors.

    Hub ids are checked where their cached snapshot can be found offline; a missing one is
    reported when loading. Every problem is a SpectraError naming the directory or file.
    """
    source = resolve_source(name)
    looks_local = Path(source).exists() or source.startswith((".", "/", "~"))
    if looks_local:
        directory = Path(source).expanduser()
        if not (directory / "config.json").is_file():
            raise SpectraError(
                f"The model directory {source!r} does not exist or has no config.json. Give a directory "
                "saved with save_pretrained, an alias (spectra models lists them) or a hub id."
            )
        missing = []
        if not any((directory / f).is_file() for f in WEIGHT_FILES) and not any(directory.glob("*.safetensors")):
            missing.append(f"no weights ({' or '.join(WEIGHT_FILES[::2])}, or a sharded index)")
        if not any((directory / f).is_file() for f in TOKENIZER_FILES):
            missing.append(f"no tokenizer ({' or '.join(TOKENIZER_FILES[:2])} with its vocabulary)")
        if missing:
            raise SpectraError(
                f"The model directory {directory} has config.json but {' and '.join(missing)}. Save the complete model "
                "there with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), or point --model at a "
                "complete directory."
            )
    else:
        directory = _cached_snapshot(source)
        if directory is None:
            return
    for path in sorted(directory.glob("*.safetensors")):
        check_safetensors(path)


def _cached_snapshot(hub_id: str) -> Path | None:
    """The local snapshot directory of a cached hub model, or None when it is not cached (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"; loading reports it
        return None


def check_safetensors(path: Path) -> None:
    """A safetensors file's header must parse and its tensors must end exactly at the end of the file.

    Reads only the header, so it is instant even for large shards; it catches truncated copies,
    interrupted downloads and files that are not safetensors at all.
    """
    size = path.stat().st_size

    def damaged(problem: str) -> SpectraError:
        return SpectraError(
            f"The model file {path} is damaged: {problem}. Copy or download it again (an interrupted download or a "
            "full disk leaves such files), then run the command again."
        )

    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or length > size - 8:
            raise damaged(f"it is {size} bytes long, too short for the header it starts with (it is truncated or "
                          "not a safetensors file)")
        try:
            header = json.loads(handle.read(length))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise damaged("its header is not valid safetensors JSON") from None
    if 8 + length + end != size:
        raise damaged(f"its header describes {8 + length + end} bytes but the file holds {size} "
                      f"({'it is truncated' if size < 8 + length + end else 'it has trailing bytes'})")


def load_tokenizer(name: str = "tiny", allow_download: bool = False) -> object:
    """The tokenizer of a model (cheap), loaded alone so that records can be checked before the weights load."""
    from transformers import AutoTokenizer

    source = resolve_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
    except OSError as err:
        raise _not_cached(name, source) from err
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a tokenizer it cannot build
        raise SpectraError(
            f"The tokenizer of {source} could not be loaded ({type(err).__name__}: {err}). Save it next to the model "
            "with tokenizer.save_pretrained(DIR), or point --model at a complete directory."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str = "tiny", device: str = "auto", dtype: str = "float32", allow_download: bool = False,
    tokenizer: object | None = None, device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM (or BERT) with its tokenizer and adapter, from the local cache by default.

    ``dtype="auto"`` keeps the checkpoint's dtype; ``device_map`` (e.g. "auto", through accelerate)
    spreads a model too large for one device over all of them, and ``device`` is then ignored:
    activations move between devices inside the forward pass, and the editors gather keys and
    solve on the first device. Files are checked before loading and every weight after it: NaN or
    inf anywhere is an error that names the parameter, before any measurement could use it.
    """
    from transformers import AutoModelForCausalLM

    check_device_map(device_map)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    source = resolve_source(name)
    check_model_source(name)
    if tokenizer is None:
        tokenizer = load_tokenizer(name, allow_download)
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=not allow_download,
                                                     **placement)
    except OSError as err:
        if Path(source).is_dir():
            raise SpectraError(f"Cannot read the model in {source} ({err}). Check that its files are readable and "
                               "complete, then run the command again.") from err
        raise _not_cached(name, source) from err
    except Exception as err:  # noqa: BLE001 - transformers and safetensors raise many types for damaged weights
        raise SpectraError(
            f"Loading the weights of {source} failed ({type(err).__name__}: {err}). The files are probably damaged or "
            "do not match its config.json; copy or download the model again."
        ) from err
    if device_map is None:
        model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    adapter = adapter_for(model)
    check_finite(model, adapter, source)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        name=name,
        source=source,
        revision=str(getattr(model.config, "_commit_hash", None) or "local"),
    )


def check_finite(model: nn.Module, adapter: Adapter, source: str) -> None:
    """NaN or inf in any parameter is a SpectraError naming it in words ("the attention query projection of layer 1")."""
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point():
            continue
        finite = torch.isfinite(parameter)
        if bool(finite.all()):
            continue
        bad = int((~finite).sum())
        raise SpectraError(
            f"The model {source} has {bad} NaN or infinite value{'s' if bad != 1 else ''} in "
            f"{describe_parameter(model, adapter, name, parameter)}. Nothing can be measured on such weights: restore "
            "the model files from a good copy (or retrain it), then run the command again."
        )


def describe_parameter(model: nn.Module, adapter: Adapter, name: str, parameter: torch.Tensor) -> str:
    """A parameter in plain words with its name: 'the attention query projection of layer 1 (model.layers.1.self_attn.q_proj.weight)'."""
    kinds = []
    for site in adapter.sites():
        try:
            if adapter.module(site).weight is parameter:
                kinds.append(site)
        except (SpectraError, AttributeError):
            continue
    if kinds:
        words = " / ".join(KIND_WORDS[site.kind] for site in kinds)
        return f"the {words} of layer {kinds[0].layer} (parameter {name})"
    embeddings = model.get_input_embeddings()
    if embeddings is not None and getattr(embeddings, "weight", None) is parameter:
        return f"the token embeddings (parameter {name})"
    layer = re.search(r"\.(\d+)\.", name)
    return f"parameter {name}" + (f" (in layer {layer.group(1)})" if layer else "")


def model_width(name: str, allow_download: bool = False) -> int:
    """The hidden size of a model, read from its config alone (no weights)."""
    from transformers import AutoConfig

    source = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=not allow_download)
    except OSError as err:
        raise _not_cached(name, source) from err
    except ValueError as err:
        raise SpectraError(f"The config.json of {source} cannot be read ({err}). Restore it from a good copy of the "
                           "model.") from err
    return int(config.hidden_size)


def model_size(name: str) -> ModelSize | None:
    """The size of an aliased model (by alias or the hub id it resolves to), else None."""
    source = resolve_source(name)
    return next((size for alias, size in MODEL_SIZES.items() if resolve_source(alias) == source), None)


def _not_cached(name: str, source: str) -> SpectraError:
    """The one message for a model that is not available offline: what it needs and the command that fetches it."""
    size = model_size(name)
    needs = f" It has {size.describe()}." if size is not None else ""
    return SpectraError(
        f"The model {name!r} ({source}) is not in the local Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}).{needs} Download it once with "
        f"`hf download {source}` on a machine with network access (gated models such as Llama 3 need an accepted "
        "licence and `hf auth login`), point --model at a local directory, or pass --allow-download to let spectra "
        "fetch it."
    )
