"""Where the files shipped inside the package live (the embedded tiny-world model and its world)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def tiny_model_dir() -> Path:
    """Directory of the embedded tiny-world model (weights, tokenizer, world files)."""
    return Path(str(resources.files("spectra") / "assets" / "tiny"))
