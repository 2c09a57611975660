"""Editor registry: names to editor classes, imported only when chosen; duplicate names are errors."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from spectra.editing.base import LocateEditEditor
from spectra.editing.hparams import MemitHParams
from spectra.editing.stats import Corpus, MomentSource, StatsCache
from spectra.errors import SpectraError

#: The built-in editors, as "module:Class" so that choosing one imports only its module.
BUILTIN_EDITORS: dict[str, str] = {
    "memit": "spectra.editing.memit:MemitEditor",
    "alphaedit": "spectra.editing.alphaedit:AlphaEditEditor",
    "rect": "spectra.editing.rect:RectEditor",
    "prune": "spectra.editing.prune:PruneEditor",
    "nse": "spectra.editing.nse:NseEditor",
}


class EditorRegistry:
    """Names to editor classes (or "module:Class" strings, resolved on first use)."""

    def __init__(self) -> None:
        self._targets: dict[str, str | type[LocateEditEditor]] = {}

    def register(self, name: str, target: str | type[LocateEditEditor]) -> None:
        """Add an editor under ``name``; registering a name twice is an error."""
        if name in self._targets:
            raise SpectraError(f"An editor named {name!r} is already registered.")
        self._targets[name] = target

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._targets)

    def resolve(self, name: str) -> type[LocateEditEditor]:
        """The editor class for ``name``, importing its module now if needed."""
        if name not in self._targets:
            raise SpectraError(f"Unknown editor {name!r}; choose one of {', '.join(self.names())}.")
        target = self._targets[name]
        if isinstance(target, str):
            module, _, attribute = target.partition(":")
            target = getattr(import_module(module), attribute)
            self._targets[name] = target
        return target

    def hparams(self, name: str, model: str, **overrides: Any) -> MemitHParams:
        """The editor's default hyperparameters for a model alias, with overrides."""
        return self.resolve(name).hparams_class.for_model(model, **overrides)

    def create(
        self, name: str, *, model: str | None = None, hparams: MemitHParams | None = None, corpus: Corpus | None = None,
        stats_cache: StatsCache | None = None, statistics: MomentSource | None = None, progress: bool = True,
        **overrides: Any,
    ) -> LocateEditEditor:
        """An editor from explicit ``hparams``, or from ``model``'s defaults plus ``overrides``.

        ``statistics`` (e.g. imported files) replaces the statistics computed from ``corpus``.
        """
        cls = self.resolve(name)
        if hparams is None:
            if model is None:
                raise SpectraError(f"Give the editor {name!r} either hparams or a model alias for its defaults.")
            hparams = cls.hparams_class.for_model(model, **overrides)
        elif overrides:
            raise SpectraError("Give either hparams or per-field overrides, not both.")
        return cls(hparams, corpus, statistics=statistics, stats_cache=stats_cache, progress=progress)


def builtin_registry() -> EditorRegistry:
    """A fresh registry holding the built-in editors (no module-level registry: extend your own copy)."""
    registry = EditorRegistry()
    for name, target in BUILTIN_EDITORS.items():
        registry.register(name, target)
    return registry


def make_editor(name: str, model: str = "tiny", corpus: Corpus | None = None, **kwargs: Any) -> LocateEditEditor:
    """Shortcut: a built-in editor with ``model``'s defaults (``kwargs``: hparams, stats_cache, statistics, overrides)."""
    if "hparams" in kwargs:
        return builtin_registry().create(name, corpus=corpus, **kwargs)
    return builtin_registry().create(name, model=model, corpus=corpus, **kwargs)
