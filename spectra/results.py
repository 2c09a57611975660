"""Run directories: one atomic, resumable on-disk format (config, tidy rows, tensors, figures) for every command.

Layout of a finished run ``runs/<YYYYmmdd-HHMMSS>-<command>/``::

    config.json           {"command", "config": every option, "provenance": seed, versions, git, ...}
    results.csv           tidy long rows: context columns (arm, round, site, ...) + metric, value
    results.parquet       the same rows, only when pyarrow is installed (exact dtypes)
    tensors.safetensors   named tensors, e.g. "ss/right/off/round=5/mlp.down@2" (see ss_key)
    figures/NAME.png|pdf  drawn by spectra.plots from the above, never from the model
    status.json           {"complete": true, ...}, written last

A run is written into the sibling ``<name>.partial/`` and renamed into place by
``RunWriter.finalize()``, so a crash never leaves a directory that looks complete. While it is
partial, ``RunWriter.checkpoint()`` publishes consistent snapshots (rows, tensors, resumable state
such as an editor's accumulators) that ``resume_run()`` reads back after a crash.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from enum import Enum
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spectra.errors import SpectraError

CONFIG_FILE = "config.json"
ROWS_CSV = "results.csv"
ROWS_PARQUET = "results.parquet"
TENSORS_FILE = "tensors.safetensors"
STATUS_FILE = "status.json"
FIGURES_DIR = "figures"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINTS_DIR = "checkpoints"
PARTIAL_SUFFIX = ".partial"

#: Options that may differ between the interrupted run and the command that resumes it.
RESUME_IGNORED = frozenset({"resume", "out"})

#: Context columns that always hold text; read back as strings even when a value looks numeric.
TEXT_COLUMNS = ("experiment", "arm", "site", "side", "task", "metric", "phase", "editor", "model", "dataset", "split")

#: Distributions whose versions every run records.
VERSIONED_PACKAGES = (
    "spectra", "torch", "transformers", "tokenizers", "numpy", "scipy", "pandas", "safetensors",
    "matplotlib", "seaborn", "scikit-learn",
)


def ss_key(side: str, arm: str, round: int, site: str) -> str:
    """The tensor name of one SS matrix: ``ss/{side}/{arm}/round={round}/{site}``; the one place the format lives."""
    return f"ss/{side}/{arm}/round={int(round)}/{site}"


def parse_ss_key(key: str) -> tuple[str, str, int, str] | None:
    """(side, arm, round, site) of an ``ss_key`` name, or None for any other tensor name."""
    parts = key.split("/", 4)
    if len(parts) != 5 or parts[0] != "ss" or not parts[3].startswith("round="):
        return None
    try:
        round_ = int(parts[3].removeprefix("round="))
    except ValueError:
        return None
    return parts[1], parts[2], round_, parts[4]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: dataclasses and mappings to dicts, tuples to lists, paths and dtypes to strings.

    Used both to write config.json and to compare configs on resume, so an option given as a
    tuple today and read back as a list tomorrow still compares equal.
    """
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def collect_provenance(config: Mapping[str, Any]) -> dict[str, Any]:
    """Where a run came from: seed, device and dtype as configured, package versions, python, platform, git, time, argv."""
    commit, dirty = _git_state(Path(__file__).resolve().parent)
    return {
        "seed": config.get("seed"),
        "device": jsonable(config.get("device")),
        "dtype": jsonable(config.get("dtype")),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {name: _version(name) for name in VERSIONED_PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "started": _now(),
        "command_line": list(sys.argv),
    }


@dataclass
class Checkpoint:
    """What an interrupted run had published: the last finished round (None before the first), rows, tensors, state."""

    round: int | None
    rows: pd.DataFrame
    tensors: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]


class RunWriter:
    """Collects one run's rows and tensors in ``<name>.partial/`` and moves them to ``<name>/`` on ``finalize()``.

    Use as a context manager: a clean exit finalizes, an exception leaves the partial directory
    (with its last checkpoint) for ``resume_run``. Rows and tensors are copied when added, so the
    caller may keep mutating its own tensors.
    """

    def __init__(self, path: Path, command: str, config: dict[str, Any], checkpoint: Checkpoint | None = None,
                 tensor_shards: list[str] | None = None) -> None:
        self.path = Path(path)
        self.partial_path = _partial_of(self.path)
        self.command = command
        self.config = config
        self._frames: list[pd.DataFrame] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._unsaved: list[str] = []  # tensor names added since the last checkpoint
        self._shards: list[str] = list(tensor_shards or [])
        self._done = False
        if checkpoint is not None:
            if len(checkpoint.rows):
                self._frames.append(checkpoint.rows)
            self._tensors.update(checkpoint.tensors)

    @property
    def figures_dir(self) -> Path:
        """Where figures go while the run is being written (moves with the run on finalize)."""
        return self.partial_path / FIGURES_DIR

    @property
    def rows(self) -> pd.DataFrame:
        """All rows added so far, as one tidy frame (missing context columns are NaN)."""
        frames = [f for f in self._frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors added so far (CPU copies)."""
        return dict(self._tensors)

    def add_rows(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> None:
        """Append tidy rows (a DataFrame or dicts with context columns plus ``metric`` and ``value``)."""
        self._check_open()
        frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        if len(frame) and not {"metric", "value"} <= set(frame.columns):
            raise ValueError(f"tidy rows need 'metric' and 'value' columns; got {list(frame.columns)}")
        self._frames.append(frame)

    def add_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store named tensors (e.g. SS matrices under ``ss_key``); a name may be stored only once."""
        self._check_open()
        for name, tensor in tensors.items():
            if name in self._tensors:
                raise ValueError(f"tensor {name!r} was already stored in this run")
            self._tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
            self._unsaved.append(name)

    def checkpoint(self, round: int, state: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
        """Publish a snapshot after finished round ``round``: all rows, all tensors, and ``state`` (name -> tensors).

        Every file of the snapshot is new (uniquely named); only then is ``checkpoint.json``
        replaced atomically to point at them, so a crash at any moment leaves the previous
        snapshot in force. Tensors are written incrementally (one shard per checkpoint) so that
        long runs do not rewrite every earlier SS matrix each round.
        """
        self._check_open()
        directory = self.partial_path / CHECKPOINTS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        token = f"{round:06d}-{uuid.uuid4().hex[:8]}"
        rows_file = f"{CHECKPOINTS_DIR}/rows-{token}.csv"
        _write_rows_csv(self.rows, self.partial_path / rows_file)
        shards = list(self._shards)
        if self._unsaved:
            shard = f"{CHECKPOINTS_DIR}/tensors-{token}.safetensors"
            save_file({name: self._tensors[name] for name in self._unsaved}, str(self.partial_path / shard))
            shards.append(shard)
        state_files = {}
        for name, tensors in (state or {}).items():
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"state name {name!r} must be a non-empty word (letters, digits, '-', '_')")
            state_files[name] = f"{CHECKPOINTS_DIR}/state-{name}-{token}.safetensors"
            save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()},
                      str(self.partial_path / state_files[name]))
        manifest = {"round": int(round), "rows": rows_file, "tensor_shards": shards, "state": state_files, "written": _now()}
        _write_json_atomic(self.partial_path / CHECKPOINT_FILE, manifest)
        self._shards, self._unsaved = shards, []
        keep = {rows_file, *shards, *state_files.values()}
        for old in directory.iterdir():
            if f"{CHECKPOINTS_DIR}/{old.name}" not in keep:
                old.unlink()

    def finalize(self) -> Path:
        """Write rows, tensors and the completion marker, then rename ``<name>.partial`` to ``<name>``; returns the run path."""
        self._check_open()
        if self.path.exists():
            raise SpectraError(
                f"Cannot finish the run: {self.path} appeared while it was running. The results are intact in "
                f"{self.partial_path}; move that directory to a free name (without the '{PARTIAL_SUFFIX}' suffix "
                "after checking it) or delete it and run again."
            )
        rows = self.rows
        _write_rows_csv(rows, self.partial_path / ROWS_CSV)
        if find_spec("pyarrow") is not None and len(rows):
            rows.to_parquet(self.partial_path / ROWS_PARQUET, index=False)
        if self._tensors:
            save_file(self._tensors, str(self.partial_path / TENSORS_FILE))
        # A finished run holds everything its checkpoints did; the resumable state is no longer needed.
        shutil.rmtree(self.partial_path / CHECKPOINTS_DIR, ignore_errors=True)
        (self.partial_path / CHECKPOINT_FILE).unlink(missing_ok=True)
        _write_json_atomic(self.partial_path / STATUS_FILE, {"complete": True, "finished": _now(),
                                                            "rows": len(rows), "tensors": len(self._tensors)})
        os.replace(self.partial_path, self.path)
        self._done = True
        return self.path

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None and not self._done:
            self.finalize()

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"run {self.path} is already finalized")


def create_run(command: str, config: Mapping[str, Any] | Any, out: Path | None = None,
               root: Path = Path("runs")) -> RunWriter:
    """Start a run of ``command``: make ``<out or root/<time>-<command>>.partial/`` and write config.json there.

    ``config`` is a mapping or a dataclass of every option with its resolved default; provenance
    (versions, git commit, platform, seed/device/dtype as configured, argv) is added alongside it.
    """
    if not command or "/" in command or command.startswith("."):
        raise ValueError(f"command name {command!r} must be a plain word")
    options = jsonable(config)
    if not isinstance(options, dict):
        raise TypeError(f"config must be a mapping or a dataclass, not {type(config).__name__}")
    if out is not None:
        path = Path(out)
        if path.exists():
            raise SpectraError(f"The output directory {path} already exists. Choose another --out, or delete it first.")
        if _partial_of(path).exists():
            raise SpectraError(
                f"An interrupted run already occupies {_partial_of(path)}. Resume it with --resume {path}, "
                "or delete that directory to start afresh."
            )
    else:
        stem = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{command}"
        path = Path(root) / stem
        suffix = 2
        while path.exists() or _partial_of(path).exists():
            path = Path(root) / f"{stem}-{suffix}"
            suffix += 1
    partial = _partial_of(path)
    partial.mkdir(parents=True)
    stored = {"command": command, "config": options, "provenance": collect_provenance(options)}
    _write_json_atomic(partial / CONFIG_FILE, stored)
    return RunWriter(path, command, options)


def resume_run(run_dir: Path, command: str, config: Mapping[str, Any] | Any,
               ignore: frozenset[str] = RESUME_IGNORED) -> tuple[RunWriter, Checkpoint]:
    """Reopen an interrupted run: a writer preloaded with its last checkpoint, and that checkpoint.

    ``run_dir`` may name the run (``runs/X``) or its partial directory (``runs/X.partial``). The
    options must equal those the run started with (except ``ignore``), because a resumed run that
    silently changed its options would mix two experiments in one table. The loop continues
    with round ``checkpoint.round + 1`` (or from the start when ``round`` is None) and restores
    its own state from ``checkpoint.state``.
    """
    partial = _resolve_partial(Path(run_dir))
    stored = _read_json(partial / CONFIG_FILE, partial)
    if stored.get("command") != command:
        raise SpectraError(
            f"Cannot resume {partial} with '{command}': it is a '{stored.get('command')}' run. "
            f"Resume it with the command that started it, or start a new run without --resume."
        )
    options = jsonable(config)
    changes = _config_changes(stored.get("config", {}), options, ignore)
    if changes:
        raise SpectraError(
            f"Cannot resume {partial}: its options differ from those it was started with ({'; '.join(changes)}). "
            "Resume with exactly the original options (they are in its config.json), or start a new run "
            "without --resume."
        )
    provenance = stored.setdefault("provenance", {})
    provenance.setdefault("resumed", []).append({"at": _now(), "command_line": list(sys.argv)})
    _write_json_atomic(partial / CONFIG_FILE, stored)
    checkpoint, shards = _read_checkpoint(partial)
    writer = RunWriter(partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX)), command,
                       stored["config"], checkpoint=checkpoint, tensor_shards=shards)
    return writer, checkpoint


class LazyTensors(Mapping[str, torch.Tensor]):
    """Read-only name -> tensor view of a safetensors file that loads each tensor only when asked for."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            self._keys: list[str] = []
        else:
            with safe_open(str(path), framework="pt") as handle:
                self._keys = sorted(handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.path is None or name not in self._keys:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class Run:
    """A finished run read back from disk: its options, provenance, tidy rows and (lazily loaded) tensors."""

    path: Path
    command: str
    config: dict[str, Any]
    provenance: dict[str, Any]
    rows: pd.DataFrame
    tensors: Mapping[str, torch.Tensor]

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES_DIR


def load_run(run_dir: Path) -> Run:
    """Read a finished run directory; a missing, interrupted or unfinished one is a SpectraError saying what to do."""
    path = Path(run_dir)
    if not path.is_dir():
        partial = _partial_of(path)
        if partial.is_dir():
            raise SpectraError(
                f"The run {path} did not finish: only its partial directory {partial} exists (the run was "
                f"interrupted or is still running). Resume it with --resume {path}, or delete {partial}."
            )
        raise SpectraError(f"No run directory at {path}. Pass a directory created by a spectra command (under runs/).")
    status_file = path / STATUS_FILE
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    if not status.get("complete"):
        raise SpectraError(
            f"{path} is not a finished spectra run (no '{STATUS_FILE}' marking it complete): it was interrupted, "
            f"is still running, or is not a run directory. Resume it with --resume {path}, or run the command again."
        )
    stored = _read_json(path / CONFIG_FILE, path)
    tensors_file = path / TENSORS_FILE
    return Run(
        path=path,
        command=stored.get("command", ""),
        config=stored.get("config", {}),
        provenance=stored.get("provenance", {}),
        rows=_read_rows(path),
        tensors=LazyTensors(tensors_file if tensors_file.is_file() else None),
    )


def _read_checkpoint(partial: Path) -> tuple[Checkpoint, list[str]]:
    """The checkpoint a partial run last published (empty, round None, when it published none) and its tensor shards."""
    manifest_file = partial / CHECKPOINT_FILE
    if not manifest_file.is_file():
        return Checkpoint(round=None, rows=pd.DataFrame(), tensors={}, state={}), []
    manifest = _read_json(manifest_file, partial)
    tensors: dict[str, torch.Tensor] = {}
    for shard in manifest["tensor_shards"]:
        tensors.update(load_file(str(partial / shard)))
    state = {name: load_file(str(partial / file)) for name, file in manifest["state"].items()}
    rows = _read_rows_csv(partial / manifest["rows"])
    return Checkpoint(round=int(manifest["round"]), rows=rows, tensors=tensors, state=state), list(manifest["tensor_shards"])


def _resolve_partial(run_dir: Path) -> Path:
    if run_dir.name.endswith(PARTIAL_SUFFIX) and run_dir.is_dir():
        return run_dir
    partial = _partial_of(run_dir)
    if partial.is_dir():
        return partial
    if (run_dir / STATUS_FILE).is_file():
        raise SpectraError(
            f"{run_dir} is a finished run; there is nothing to resume. Start a new run without --resume "
            "(or with --out naming a new directory)."
        )
    raise SpectraError(
        f"No interrupted run at {run_dir} (looked for {partial}). Pass the run directory printed when the "
        "run started, or start a new run without --resume."
    )


def _config_changes(old: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str]) -> list[str]:
    """'key: old -> new' for every option that differs, ignoring ``ignore``."""
    def show(options: Mapping[str, Any], key: str) -> str:
        return json.dumps(options[key]) if key in options else "(unset)"

    return [f"{key}: {show(old, key)} -> {show(new, key)}" for key in sorted((set(old) | set(new)) - ignore)
            if (key in old) != (key in new) or old.get(key) != new.get(key)]


def _partial_of(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _write_rows_csv(rows: pd.DataFrame, path: Path) -> None:
    """Rows as CSV with ``metric`` and ``value`` last (easier to read), via a temporary file and os.replace."""
    if len(rows.columns):
        tail = [c for c in ("metric", "value") if c in rows.columns]
        rows = rows[[c for c in rows.columns if c not in tail] + tail]
    tmp = path.with_name(path.name + ".tmp")
    rows.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _read_rows_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _read_rows(directory: Path) -> pd.DataFrame:
    if (directory / ROWS_PARQUET).is_file() and find_spec("pyarrow") is not None:
        return pd.read_parquet(directory / ROWS_PARQUET)
    return _read_rows_csv(directory / ROWS_CSV)


def _read_json(path: Path, run: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpectraError(f"{run} is damaged: cannot read {path.name} ({err}). Run the command again into a new directory.") from err


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON so a reader sees either the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _git_state(directory: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``directory`` when its files are tracked there, else (None, None)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # tracked: not a wheel that happens to sit inside another repo
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
