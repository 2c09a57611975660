"""Editing: MEMIT-family editors, key statistics, and the REVIVE filter that sits before every write."""

from spectra.editing.base import Editor, KeyCache, LocateEditEditor, memit_solve
from spectra.editing.filters import IdentityFilter, ReviveFilter, SiteFilter
from spectra.editing.hparams import (
    KNOWN_MODELS, AlphaEditHParams, MemitHParams, NseHParams, PruneHParams, RectHParams,
)
from spectra.editing.registry import BUILTIN_EDITORS, EditorRegistry, builtin_registry, make_editor
from spectra.editing.stats import KeyStatistics, StatsCache, StatsKey

__all__ = [
    "BUILTIN_EDITORS", "KNOWN_MODELS", "AlphaEditHParams", "Editor", "EditorRegistry", "IdentityFilter", "KeyCache",
    "KeyStatistics", "LocateEditEditor", "MemitHParams", "NseHParams", "PruneHParams", "RectHParams", "ReviveFilter",
    "SiteFilter", "StatsCache", "StatsKey", "builtin_registry", "make_editor", "memit_solve",
]
