"""Editor hyperparameters from the field's own files (EasyEdit YAML, the official repositories' JSON) and --set.

Resolution order: the model's per-model defaults (when spectra has them), then the file, then
each ``--set key=value``. Keys those files carry that spectra does not need (module-name
templates, device, the statistics directory, ...) are accepted and reported as ignored, with the
reason; keys nobody knows are errors, as are values spectra cannot honour (``layer_selection``
other than ``all``, ``mom2_adjustment: false``, an ``alg_name`` of another editor). YAML is read
with ``yaml.safe_load``, so a file with a Python tag is refused instead of executed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra.editing.hparams import MemitHParams, no_defaults
from spectra.errors import SpectraError

#: File keys spelled differently from spectra's field names (EasyEdit and the official code).
RENAMED = {"fact_token": "key_position", "L2": "l2"}

#: The module templates and model names that spectra's adapters replace.
_MODULES = "spectra's model adapters find the module itself"

#: File keys spectra does not need, and why (reported, never silently dropped).
IGNORED = {
    "model_name": "spectra edits the model given by --model",
    "device": "spectra places the model with --device (and --device-map)",
    "model_parallel": "spectra places the model with --device-map",
    "fp16": "spectra sets the model's precision with --dtype",
    "stats_dir": "spectra caches statistics under SPECTRA_CACHE; import precomputed ones with --stats",
    "P_loc": "spectra computes AlphaEdit's null-space projector from the key statistics",
    "mom2_dataset": "the statistics come from --stats-corpus or --stats",
    "mom2_dtype": "spectra accumulates statistics in float64 and solves in float64",
    "v_loss_layer": "spectra reads the z loss at the model's output (its last layer), as the reference does",
    "context_template_length_params": "spectra's context templates are context_prompts x context_length",
    "rewrite_module_tmp": _MODULES, "layer_module_tmp": _MODULES, "mlp_module_tmp": _MODULES,
    "attn_module_tmp": _MODULES, "ln_f_module": _MODULES, "lm_head_module": _MODULES,
    "alg_name": "checked against the editor",
    "layer_selection": "checked: spectra edits all the layers given",
    "mom2_adjustment": "checked: spectra's MEMIT-family editors always use the key statistics",
}

#: Keys whose meaning in an EasyEdit file (one with ``alg_name``) is not spectra's field of the same name.
EASYEDIT_IGNORED = {
    "batch_size": "EasyEdit's edits per call; spectra drift's --batch-size sets the edits per round",
    "max_length": "EasyEdit's prompt length cap; spectra's max_length (corpus tokens per document for the "
                  "statistics) keeps its value",
}

#: ``alg_name`` values and the spectra editors they fit (RECT and PRUNE files are MEMIT files).
ALGORITHMS = {"memit": ("memit", "rect", "prune"), "alphaedit": ("alphaedit",), "nse": ("nse",)}


@dataclass(frozen=True)
class ResolvedHParams:
    """An editor's hyperparameters and where each part came from (written into config.json)."""

    hparams: MemitHParams
    defaults: str | None = None
    file: str | None = None
    sets: tuple[str, ...] = ()
    ignored: dict[str, str] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """What config.json records: the resolved values and their sources."""
        return {"values": self.hparams.to_dict(), "defaults": self.defaults, "file": self.file,
                "set": list(self.sets), "ignored": dict(self.ignored)}

    def ignored_note(self) -> str | None:
        """One line naming the ignored file keys and why, for the console (None when there are none)."""
        if not self.ignored:
            return None
        reasons: dict[str, list[str]] = {}
        for key, why in self.ignored.items():
            reasons.setdefault(why, []).append(key)
        parts = "; ".join(f"{', '.join(keys)} ({why})" for why, keys in reasons.items())
        return f"Ignored in {self.file}: {parts}."


def read_hparams_file(path: Path) -> dict[str, Any]:
    """The key-value mapping of a YAML (safe loader) or JSON hyperparameter file; anything else is a clear error."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise SpectraError(f"The hyperparameter file {path} does not exist. Give --hparams an EasyEdit YAML or an "
                           "official repository's JSON file (e.g. hparams/MEMIT/llama3-8b.yaml).")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        raise SpectraError(
            f"The hyperparameter file {path} carries a YAML tag that would construct Python objects ({err.problem}). "
            "spectra reads YAML with a safe loader and never runs code from a file: write plain values (numbers, "
            "strings, lists) instead."
        ) from None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise SpectraError(f"The hyperparameter file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                           f" ({err}). Fix the file and run again.") from None
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise SpectraError(f"The hyperparameter file {path} must hold one mapping of names to values (like EasyEdit's "
                           f"hparams/MEMIT/*.yaml); it holds a {type(data).__name__}.")
    return data


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` items as a mapping; values are parsed as YAML scalars or lists (``[4,5]``, ``1e-3``)."""
    import yaml

    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpectraError(f"--set takes key=value (e.g. --set v_lr=0.5 or --set layers=[4,5,6]); got {item!r}.")
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            values[key.strip()] = text
    return values


def translate(cls: type[MemitHParams], data: Mapping[str, Any], editor: str, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A file's values under spectra's field names, and the ignored keys with their reasons.

    Unknown keys, another editor's ``alg_name`` and settings spectra cannot honour are errors.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    easyedit = "alg_name" in data
    values: dict[str, Any] = {}
    ignored: dict[str, str] = {}
    unknown = []
    for key, value in data.items():
        if easyedit and key in EASYEDIT_IGNORED:
            ignored[key] = EASYEDIT_IGNORED[key]
        elif key in IGNORED:
            _check_ignored(key, value, editor, where)
            ignored[key] = IGNORED[key]
        elif RENAMED.get(key, key) in names:
            values[RENAMED.get(key, key)] = value
        else:
            unknown.append(key)
    if unknown:
        raise SpectraError(
            f"{where} has key(s) {', '.join(sorted(unknown))} that {cls.__name__} ({editor}) does not know. Its keys "
            f"are {', '.join(sorted(names))} (EasyEdit's fact_token and L2 are read as key_position and l2); keys "
            f"spectra accepts and ignores are {', '.join(sorted(IGNORED))}. Remove or rename the key."
        )
    return values, ignored


def _check_ignored(key: str, value: Any, editor: str, where: str) -> None:
    """The ignored keys that must still agree with what spectra does."""
    if key == "alg_name":
        fits = ALGORITHMS.get(str(value).lower(), ())
        if editor not in fits:
            raise SpectraError(f"{where} is a {value} file (alg_name), but the editor is {editor}. Pass the editor it "
                               f"was written for (--editor {fits[0] if fits else '...'}) or a file for {editor}.")
    elif key == "layer_selection" and value != "all":
        raise SpectraError(f"{where} sets layer_selection: {value}; spectra edits exactly the layers given "
                           "('all'). Set it to all or remove it.")
    elif key == "mom2_adjustment" and value is not True:
        raise SpectraError(f"{where} sets mom2_adjustment: {value}; spectra's MEMIT-family editors always weigh the "
                           "update by the key statistics (true). Set it to true or remove it.")


def coerce(cls: type[MemitHParams], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Each value converted to its field's type (YAML reads '5e-1' as text; lists become tuples), or a clear error."""
    hints = typing.get_type_hints(cls)
    return {name: _coerce_value(hints[name], value, name, where) for name, value in values.items()}


def _coerce_value(hint: Any, value: Any, name: str, where: str) -> Any:
    """One value as type ``hint``."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    problems = []
    for option in (o for o in options if o is not type(None)):
        try:
            return _as(option, value)
        except (TypeError, ValueError) as err:
            problems.append(str(err))
    raise SpectraError(f"{where}: {name} = {value!r} is not a valid value ({'; '.join(problems)}). Fix it and run again.")


def _as(kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (bool, int, float, str or tuple[T, ...]); TypeError/ValueError when it is not one."""
    if typing.get_origin(kind) is tuple:
        inner = typing.get_args(kind)[0]
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_as(inner, item) for item in items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("expected true or false")
    if isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got a boolean")
    if kind is int:
        number = float(value)
        if not number.is_integer():
            raise ValueError("expected a whole number")
        return int(number)
    if kind is float:
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError("expected text")
        return value
    raise TypeError(f"unsupported type {kind}")


def resolve_hparams(
    cls: type[MemitHParams], editor: str, model: str, defaults: str | None,
    source: Path | Mapping[str, Any] | None = None, sets: Sequence[str] = (), overrides: Mapping[str, Any] | None = None,
) -> ResolvedHParams:
    """The editor's hyperparameters for ``model``: ``defaults``' per-model values, then ``source`` (a file or a
    mapping), then ``sets``.

    ``overrides`` (spectra field names: the drift run's seed and placement) are applied last.
    Without per-model defaults the file must supply every value without a default (``layers``).
    """
    if defaults is None and source is None:
        raise no_defaults(cls.__name__, model)
    values: dict[str, Any] = cls.model_defaults(defaults) if defaults is not None else {}
    ignored: dict[str, str] = {}
    file = None
    if source is not None:
        where = "the hyperparameters given" if isinstance(source, Mapping) else f"The hyperparameter file {source}"
        data = dict(source) if isinstance(source, Mapping) else read_hparams_file(Path(source))
        file = None if isinstance(source, Mapping) else str(source)
        given, ignored = translate(cls, data, editor, where)
        values.update(coerce(cls, given, where))
    if sets:
        given, _ = translate(cls, parse_sets(sets), editor, "--set")
        values.update(coerce(cls, given, "--set"))
    values.update(overrides or {})
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpectraError(
            f"The {editor} hyperparameters lack {', '.join(missing)}, which have no default"
            f"{'' if defaults is None else f' for {defaults}'}. Add them to the --hparams file or pass --set "
            f"{missing[0]}=... (e.g. --set layers=[4,5,6,7,8])."
        )
    return ResolvedHParams(cls(**values), defaults, file, tuple(sets), ignored)
