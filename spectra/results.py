"""Run directories: one atomic, resumable, verified on-disk format (config, tidy rows, tensors, figures) for every command.

Layout of a finished run ``runs/<YYYYmmdd-HHMMSS>-<command>/``::

    config.json           {"command", "config": every option, "provenance": seed, versions, git, ...}
    results.csv           tidy long rows: context columns (arm, round, site, ...) + metric, value
    results.parquet       the same rows, only when pyarrow is installed (exact dtypes)
    tensors.safetensors   named tensors, e.g. "ss/right/off/round=5/mlp.down@2" (see ss_key)
    state/NAME.safetensors  what continuing the run needs (a drift run: each arm's edited weights)
    figures/NAME.png|pdf  drawn by spectra.plots from the above, never from the model
    NAME.csv              extra tables of per-item rows, e.g. samples.csv (``--log-samples``: one row per scored prompt)
    status.json           {"complete": true, "files": {name: sha256, size, rows/tensors}, ...}, written last

A run is written into the sibling ``<name>.partial/`` and renamed into place by
``RunWriter.finalize()``, so a crash never leaves a directory that looks complete. Guarantees:

- **One writer.** The partial directory holds ``.lock``, locked with ``flock`` by the writing
  process (the kernel releases it when the process dies, even by SIGKILL); a second writer is
  refused with a message naming the live process (``spectra.runlock``).
- **Checkpoints that can be trusted.** ``RunWriter.checkpoint()`` writes every file of a snapshot
  under a new name, then replaces ``checkpoint.json`` (which lists each file's sha256 and row or
  tensor count) atomically, keeping the one before as ``checkpoint.previous.json``. ``resume_run``
  verifies every file; when the newest snapshot is damaged it falls back to the previous one and
  says so, and when no snapshot is intact it refuses. Damaged data is never finished silently.
- **Verified on read.** ``load_run`` (and so ``spectra plot``) checks every file against
  status.json before reading it.
- **Clean failures.** A failed write (disk full, permission, read-only) becomes a SpectraError that
  says which checkpoint is intact and how to resume; SIGTERM/SIGINT inside a ``RunWriter.running()``
  block stop the run between writes, never in the middle of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime
from enum import Enum
from importlib import metadata
from importlib.util import find_spec
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from spectra.errors import RunInterrupted, SpectraError
from spectra.runlock import (
    PARTIAL_SUFFIX, RunLock, SignalGuard, Stop, busy_message, fix, live_writer, now, partial_of, reason, run_of,
)

CONFIG_FILE = "config.json"
ROWS_CSV = "results.csv"
ROWS_PARQUET = "results.parquet"
TENSORS_FILE = "tensors.safetensors"
STATUS_FILE = "status.json"
FIGURES_DIR = "figures"
STATE_DIR = "state"
CHECKPOINT_FILE = "checkpoint.json"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.previous.json"
CHECKPOINTS_DIR = "checkpoints"
TMP_SUFFIX = ".tmp"

#: Options that may differ between the interrupted run and the command that resumes it.
RESUME_IGNORED = frozenset({"resume", "out"})

#: Context columns that always hold text; read back as strings even when a value looks numeric.
TEXT_COLUMNS = ("experiment", "arm", "site", "side", "task", "metric", "phase", "editor", "model", "dataset", "split",
                "unit", "prompt_kind", "kind")

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
        "started": now(),
        "command_line": list(sys.argv),
    }


@dataclass
class Checkpoint:
    """What an interrupted run had published: its last finished step, rows, tensors and state.

    ``round`` is the caller's step number (None before the first checkpoint), ``meta`` the JSON the
    caller stored with it, ``progress`` its description ("round 3 of arm 'off'"), and ``note`` what
    reading it had to do (fall back to the previous checkpoint, finish a completed run), for the user.
    """

    round: int | None
    rows: pd.DataFrame
    tensors: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)
    progress: str = ""
    note: str | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class _Published:
    """The files a checkpoint (or a finished run) consists of: manifest entries {file, sha256, bytes, rows|tensors}."""

    rows: dict[str, Any] | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: extra tables by name, each as row shards (one per checkpoint that added rows to it)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def files(self) -> set[str]:
        """Every file (relative to the run directory) these entries refer to."""
        entries = ([self.rows] if self.rows else []) + self.shards + list(self.state.values())
        entries += [entry for shards in self.tables.values() for entry in shards]
        return {entry["file"] for entry in entries}


class RunWriter:
    """Collects one run's rows and tensors in ``<name>.partial/`` and moves them to ``<name>/`` on ``finalize()``.

    It holds the run's lock from creation until ``finalize()`` or ``close()``. Use it as a context
    manager (a clean exit finalizes, any exit releases the lock), or run long work inside
    ``running()``. Rows and tensors are copied when added, so the caller may keep mutating its own
    tensors.
    """

    def __init__(self, path: Path, command: str, config: dict[str, Any], lock: RunLock | None = None,
                 checkpoint: Checkpoint | None = None, published: _Published | None = None, new: bool = False) -> None:
        self.path = Path(path)
        self._new = new  # a run this writer started: if it fails before any checkpoint, nothing of it is kept
        self.partial_path = partial_of(self.path)
        self.command = command
        self.config = config
        self.progress = checkpoint.progress if checkpoint is not None else ""
        self._lock = lock
        self._frames: list[pd.DataFrame] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._unsaved: list[str] = []  # tensor names added since the last checkpoint
        self._published = published or _Published()
        self._meta: dict[str, Any] = dict(checkpoint.meta) if checkpoint is not None else {}
        self._round = checkpoint.round if checkpoint is not None else None
        self._signals = SignalGuard()
        self._done = False
        self._unsaved_state: dict[str, Mapping[str, torch.Tensor]] = {}
        self._tables: dict[str, list[pd.DataFrame]] = {}
        self._unsaved_tables: dict[str, list[pd.DataFrame]] = {}  # table rows added since the last checkpoint
        if checkpoint is not None:
            if len(checkpoint.rows):
                self._frames.append(checkpoint.rows)
            self._tensors.update(checkpoint.tensors)
            self._tables = {name: [frame] for name, frame in checkpoint.tables.items()}
            if published is None:  # nothing of it is in a checkpoint of this directory yet: a reopened finished run
                self._unsaved = list(checkpoint.tensors)
                self._unsaved_state = dict(checkpoint.state)
                self._unsaved_tables = {name: [frame] for name, frame in checkpoint.tables.items()}

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

    def table(self, name: str) -> pd.DataFrame:
        """All rows of the extra table ``name`` added so far (empty when there are none)."""
        frames = [f for f in self._tables.get(name, []) if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def resume_command(self) -> str:
        """The command line that continues this run."""
        return f"spectra {self.command} --resume {self.path}"

    def add_rows(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> None:
        """Append tidy rows (a DataFrame or dicts with context columns plus ``metric`` and ``value``)."""
        self._check_open()
        frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        if len(frame) and not {"metric", "value"} <= set(frame.columns):
            raise ValueError(f"tidy rows need 'metric' and 'value' columns; got {list(frame.columns)}")
        self._frames.append(frame)

    def add_table_rows(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows to the extra table ``name`` (written as ``<name>.csv``; checkpointed in shards of new rows)."""
        self._check_open()
        if not name.isidentifier() or name in ("results", "status", "config", "checkpoint"):
            raise ValueError(f"table name {name!r} must be a word that names no other run file")
        frame = pd.DataFrame(list(rows))
        if len(frame):
            self._tables.setdefault(name, []).append(frame)
            self._unsaved_tables.setdefault(name, []).append(frame)

    def add_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store named tensors (e.g. SS matrices under ``ss_key``); a name may be stored only once."""
        self._check_open()
        for name, tensor in tensors.items():
            if name in self._tensors:
                raise ValueError(f"tensor {name!r} was already stored in this run")
            self._tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
            self._unsaved.append(name)

    def checkpoint(self, round: int, state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                   meta: Mapping[str, Any] | None = None, progress: str = "") -> None:
        """Publish a snapshot after step ``round``: all rows, all tensors, ``state`` and ``meta``.

        ``state`` maps names to tensors; a name not given keeps the file of the previous checkpoint
        (so state that no longer changes is not rewritten). Tensors are written incrementally (one
        shard per checkpoint). Every file is new (uniquely named) and checksummed; only then is
        ``checkpoint.json`` replaced atomically to list them, so a crash at any moment leaves the
        previous snapshot in force. ``progress`` says in words how far the run got.
        """
        self._check_open()
        for name in state or {}:
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"state name {name!r} must be a non-empty word (letters, digits, '-', '_')")
        directory = self.partial_path / CHECKPOINTS_DIR
        token = f"{round:06d}-{uuid.uuid4().hex[:8]}"
        written: list[Path] = []
        label = progress or f"step {round}"
        with self._writing(f"the checkpoint after {label}", written):
            directory.mkdir(parents=True, exist_ok=True)
            rows = self.rows
            rows_entry = self._write_file(f"{CHECKPOINTS_DIR}/rows-{token}.csv", _rows_csv(rows), written, rows=len(rows))
            shards = list(self._published.shards)
            if self._unsaved:
                shard = {name: self._tensors[name] for name in self._unsaved}
                shards.append(self._save_tensors(f"{CHECKPOINTS_DIR}/tensors-{token}.safetensors", shard, written))
            states = dict(self._published.state)
            for name, tensors in {**self._unsaved_state, **(state or {})}.items():
                states[name] = self._save_tensors(f"{CHECKPOINTS_DIR}/state-{name}-{token}.safetensors",
                                                  _cpu(tensors), written)
            tables = {name: list(entries) for name, entries in self._published.tables.items()}
            for name, frames in self._unsaved_tables.items():
                new_rows = pd.concat(frames, ignore_index=True)
                tables.setdefault(name, []).append(self._write_file(
                    f"{CHECKPOINTS_DIR}/table-{name}-{token}.csv", _rows_csv(new_rows, tail=()), written, rows=len(new_rows)))
            published = _Published(rows_entry, shards, states, tables)
            manifest = {"round": int(round), "progress": label, "meta": jsonable(dict(meta or self._meta)),
                        "rows": rows_entry, "tensor_shards": shards, "state": states, "written": now()}
            if tables:
                manifest["tables"] = tables
            previous = self.partial_path / CHECKPOINT_FILE
            if previous.is_file():
                _write_json_atomic(self.partial_path / PREVIOUS_CHECKPOINT_FILE, self._manifest())
            _write_json_atomic(previous, manifest)
            # A reopened finished run's status.json no longer describes the run once a checkpoint supersedes it.
            (self.partial_path / STATUS_FILE).unlink(missing_ok=True)
            keep = published.files() | self._published.files()
            self._published, self._unsaved, self._unsaved_state, self._unsaved_tables = published, [], {}, {}
            self._meta, self._round, self.progress = manifest["meta"], int(round), label
            _remove_strays(directory, keep, prefix=f"{CHECKPOINTS_DIR}/")

    def finalize(self, keep_state: bool = False) -> Path:
        """Write rows, tensors (and with ``keep_state`` the last state) and status.json, then rename ``<name>.partial`` to ``<name>``.

        The order makes every crash recoverable: the final files first, then status.json with their
        checksums, then the checkpoints are removed, then the directory is renamed.
        """
        self._check_open()
        if self.path.exists():
            raise SpectraError(
                f"Cannot finish the run: {self.path} appeared while it was running. The results are intact in "
                f"{self.partial_path}; move that directory to a free name (without the '{PARTIAL_SUFFIX}' suffix "
                "after checking it) or delete it and run again."
            )
        written: list[Path] = []  # only temporary files: a failed finish must not remove a file a checkpoint lists
        with self._writing("the finished run's files", written):
            rows = self.rows
            files = {ROWS_CSV: self._write_file(ROWS_CSV, _rows_csv(rows), [], rows=len(rows))}
            if find_spec("pyarrow") is not None and len(rows):
                buffer = rows.to_parquet(index=False)
                files[ROWS_PARQUET] = self._write_file(ROWS_PARQUET, buffer, [], rows=len(rows))
            if self._tensors:
                files[TENSORS_FILE] = self._save_tensors(TENSORS_FILE, self._tensors, written, replace=True)
            tables = {name: self.table(name) for name in self._tables}
            for name, table in tables.items():
                files[f"{name}.csv"] = self._write_file(f"{name}.csv", _rows_csv(table, tail=()), [], rows=len(table))
            state_files = self._keep_state() if keep_state else {}
            files.update(state_files)
            status = {"complete": True, "finished": now(), "rows": len(rows), "tensors": len(self._tensors),
                      "round": self._round, "progress": self.progress, "meta": self._meta, "files": files}
            if tables:
                status["tables"] = {name: len(table) for name, table in tables.items()}
            _write_json_atomic(self.partial_path / STATUS_FILE, status)
            for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
                (self.partial_path / name).unlink(missing_ok=True)
            shutil.rmtree(self.partial_path / CHECKPOINTS_DIR, ignore_errors=True)
            _remove_strays(self.partial_path / STATE_DIR, set(state_files), prefix=f"{STATE_DIR}/")
            os.replace(self.partial_path, self.path)
        self._done = True
        if self._lock is not None:
            self._lock.moved_to(self.path)
            self._lock.release(remove=True)
        return self.path

    def close(self) -> None:
        """Release the run's lock without finishing it (the partial directory stays resumable)."""
        if self._lock is not None:
            self._lock.release()

    @contextmanager
    def running(self) -> Iterator["RunWriter"]:
        """The body of a run: SIGTERM/SIGINT stop it cleanly (RunInterrupted), and any exit releases the lock.

        A new run that fails or stops before its first checkpoint holds nothing worth resuming, so
        its partial directory is removed rather than left to block the next attempt.
        """
        try:
            with self._signals:
                yield self
        except BaseException as err:
            discard = self._new and self._round is None and not self._done
            if discard:
                shutil.rmtree(self.partial_path, ignore_errors=True)
            if isinstance(err, Stop):
                raise RunInterrupted(self._interrupted(err.signum, discard), err.signum) from None
            raise
        finally:
            self.close()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        try:
            if exc_type is None and not self._done:
                self.finalize()
        finally:
            self.close()

    # -- internals ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"run {self.path} is already finalized")

    def _manifest(self) -> dict[str, Any]:
        """The manifest of the checkpoint now in force (written as the previous one when the next replaces it)."""
        manifest = {"round": self._round, "progress": self.progress, "meta": self._meta, "rows": self._published.rows,
                    "tensor_shards": self._published.shards, "state": self._published.state, "written": now()}
        if self._published.tables:
            manifest["tables"] = self._published.tables
        return manifest

    @contextmanager
    def _writing(self, what: str, written: list[Path]) -> Iterator[None]:
        """Writes that no signal interrupts; a failed write removes what it wrote and says what is intact."""
        with self._signals.writing():
            try:
                yield
            except (OSError, SafetensorError) as err:
                for path in written:
                    path.unlink(missing_ok=True)
                raise SpectraError(self._write_failed(what, err)) from err

    def _write_file(self, name: str, data: bytes, written: list[Path], **counts: int) -> dict[str, Any]:
        """Write ``data`` to ``name`` (atomically) and return its manifest entry."""
        path = self.partial_path / name
        written.append(path)
        _write_bytes_atomic(path, data)
        return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **counts}

    def _save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], written: list[Path],
                      replace: bool = False) -> dict[str, Any]:
        """Save tensors as safetensors under ``name`` (via a temporary file when ``replace``) and return its entry."""
        path = self.partial_path / name
        target = path.with_name(path.name + TMP_SUFFIX) if replace else path
        written.append(target)
        save_file(dict(tensors), str(target))
        if replace:
            os.replace(target, path)
        digest, size = _digest(path)
        return {"file": name, "sha256": digest, "bytes": size, "tensors": len(tensors)}

    def _keep_state(self) -> dict[str, dict[str, Any]]:
        """The state in force as ``state/<name>.safetensors`` (hard links, or copies where links are impossible)."""
        (self.partial_path / STATE_DIR).mkdir(exist_ok=True)
        kept = {}
        for name, entry in self._published.state.items():
            target = f"{STATE_DIR}/{name}.safetensors"
            if entry["file"] != target:
                source, tmp = self.partial_path / entry["file"], self.partial_path / (target + TMP_SUFFIX)
                tmp.unlink(missing_ok=True)
                try:
                    os.link(source, tmp)
                except OSError:
                    shutil.copyfile(source, tmp)
                os.replace(tmp, self.partial_path / target)
            kept[target] = {**entry, "file": target}
        return kept

    def _write_failed(self, what: str, err: BaseException) -> str:
        """One paragraph: what could not be written and why, what is intact, and how to go on."""
        cause, remedy = reason(err), fix(err, self.partial_path)
        if self._round is not None:
            return (
                f"Could not write {what} into {self.partial_path}: {cause}. Nothing written before is lost: the last "
                f"complete checkpoint ({self.progress}) is intact. {remedy}, then continue the run with "
                f"`{self.resume_command}`."
            )
        return f"Could not write {what} into {self.partial_path}: {cause}. {remedy}, then run the command again."

    def _interrupted(self, signum: int, discarded: bool) -> str:
        """What a stopped run tells the user: which signal, how far it got, and the resume command."""
        name = signal.Signals(signum).name
        if self._done:
            return (f"Stopped by {name} after the run had finished: it is complete in {self.path}. Its figures may be "
                    f"missing; `spectra plot {self.path}` draws them.")
        if discarded:
            return (f"Stopped by {name} before the first checkpoint, so nothing was saved and {self.partial_path} was "
                    "removed. Run the command again.")
        if self._round is None:
            return (f"Stopped by {name} before the first checkpoint of this attempt. Continue the run with "
                    f"`{self.resume_command}` (it starts from the beginning) or delete {self.partial_path}.")
        return (f"Stopped by {name}. The run got as far as {self.progress}; that checkpoint is saved in "
                f"{self.partial_path} and nothing was left half-written. Continue it with `{self.resume_command}`.")


def check_run_target(out: Path | None, root: Path = Path("runs")) -> None:
    """Refuse, before any work, an ``--out`` that exists, is being written, holds an interrupted run, or cannot be written."""
    if out is not None:
        path = Path(out)
        if path.exists():
            raise SpectraError(f"The output directory {path} already exists. Choose another --out, or delete it first.")
        partial = partial_of(path)
        if partial.exists():
            if live_writer(partial) is not None:
                raise SpectraError(busy_message(partial))
            raise SpectraError(
                f"An interrupted run already occupies {partial}. Continue it with --resume {path}, or delete that "
                "directory to start afresh."
            )
        target = partial
    else:
        target = Path(root) / "run"
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SpectraError(f"Cannot write the run directory {target.parent}: {ancestor} is a file, not a directory. "
                           "Choose another --out.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(ancestor).f_flag & os.ST_RDONLY)
        err = OSError(errno.EROFS if read_only else errno.EACCES, os.strerror(errno.EROFS if read_only else errno.EACCES))
        raise SpectraError(
            f"Cannot write the run directory {target.parent}: {ancestor} is not writable ({reason(err)}). "
            f"{fix(err, ancestor)}, or choose --out on a writable disk."
        )


def create_run(command: str, config: Mapping[str, Any] | Any, out: Path | None = None,
               root: Path = Path("runs"), provenance: Mapping[str, Any] | None = None) -> RunWriter:
    """Start a run of ``command``: make and lock ``<out or root/<time>-<command>>.partial/`` and write config.json there.

    ``config`` is a mapping or a dataclass of every option with its resolved default; provenance
    (versions, git commit, platform, seed/device/dtype as configured, argv, plus ``provenance``) is
    added alongside it.
    """
    if not command or "/" in command or command.startswith("."):
        raise ValueError(f"command name {command!r} must be a plain word")
    options = jsonable(config)
    if not isinstance(options, dict):
        raise TypeError(f"config must be a mapping or a dataclass, not {type(config).__name__}")
    check_run_target(out, root)
    if out is not None:
        path = Path(out)
    else:
        stem = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{command}"
        path = Path(root) / stem
        suffix = 2
        while path.exists() or partial_of(path).exists():
            path = Path(root) / f"{stem}-{suffix}"
            suffix += 1
    partial = partial_of(path)
    try:
        partial.mkdir(parents=True)
    except FileExistsError:
        raise SpectraError(f"Another process started a run in {partial} just now. Choose another --out.") from None
    except OSError as err:
        raise SpectraError(f"Cannot create the run directory {partial}: {reason(err)}. {fix(err, partial.parent)}, "
                           "or choose --out on a writable disk.") from err
    lock = RunLock.acquire(partial)
    stored = {"command": command, "config": options,
              "provenance": {**collect_provenance(options), **jsonable(dict(provenance or {}))}}
    try:
        _write_json_atomic(partial / CONFIG_FILE, stored)
    except OSError as err:
        lock.release()
        shutil.rmtree(partial, ignore_errors=True)
        raise SpectraError(f"Cannot write {partial / CONFIG_FILE}: {reason(err)}. {fix(err, partial)}, "
                           "or choose --out on a writable disk.") from err
    return RunWriter(path, command, options, lock=lock, new=True)


@dataclass(frozen=True)
class StoredRun:
    """A run directory as ``--resume`` finds it, read without taking its lock: where it is, its command and options."""

    path: Path
    directory: Path
    finished: bool
    command: str
    config: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)


def inspect_run(run_dir: Path) -> StoredRun:
    """Find the run ``run_dir`` names (``runs/X`` or ``runs/X.partial``) and read its command and options; no lock, no model."""
    run_dir = Path(run_dir)
    path = run_of(run_dir)
    partial = partial_of(path)
    if partial.is_dir():
        directory, finished = partial, False
    elif (path / STATUS_FILE).is_file():
        directory, finished = path, True
    elif path.is_dir():
        raise SpectraError(
            f"{path} is not a spectra run directory that can be continued (it has no '{STATUS_FILE}' and there is no "
            f"{partial}). Pass the run directory printed when the run started, or start a new run without --resume."
        )
    else:
        raise SpectraError(
            f"No run at {path} (looked for {path} and {partial}). Pass the run directory printed when the run "
            "started, or start a new run without --resume."
        )
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise SpectraError(
            f"{directory} has no {CONFIG_FILE}: the run was stopped before it had started, so there is nothing to "
            f"continue. Delete {directory} and start the run again."
        )
    stored = _read_json(config_file, directory)
    if not isinstance(stored.get("config"), dict):
        raise SpectraError(f"{config_file} holds no options ('config'); the run cannot be continued. Delete "
                           f"{directory} and start the run again.")
    provenance = stored.get("provenance")
    return StoredRun(path, directory, finished, str(stored.get("command", "")), stored["config"],
                     provenance if isinstance(provenance, dict) else {})


def resume_run(run_dir: Path, command: str, config: Mapping[str, Any] | Any, ignore: frozenset[str] = RESUME_IGNORED,
               extendable: frozenset[str] = frozenset()) -> tuple[RunWriter, Checkpoint]:
    """Reopen a run to continue it: a locked writer preloaded with its last intact checkpoint, and that checkpoint.

    ``run_dir`` may name the run (``runs/X``) or its partial directory (``runs/X.partial``). The
    options must equal those the run started with, except ``ignore`` and the ``extendable``
    numbers, which may grow; a finished run is reopened only when one of them grows (its last
    state becomes the checkpoint). A resumed run that silently changed other options would mix two
    experiments in one table. Every file is verified against its checksum before it is used.
    """
    found = inspect_run(run_dir)
    if found.command != command:
        raise SpectraError(
            f"Cannot resume {found.directory} with '{command}': it is a '{found.command}' run. Resume it with the "
            "command that started it, or start a new run without --resume."
        )
    options = jsonable(config)
    changes = config_changes(found.config, options, ignore | extendable)
    if changes:
        raise SpectraError(
            f"Cannot resume {found.directory}: its options differ from those it was started with ({'; '.join(changes)}). "
            "Resume with exactly the original options (they are in its config.json), or start a new run without --resume."
        )
    grown = []
    for key in sorted(extendable):
        old, new = found.config.get(key), options.get(key)
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and new < old:
            raise SpectraError(
                f"Cannot resume {found.directory} with {_option(key)} {new}: it was started with {old}, and a run can "
                f"be extended but never shortened. Resume with {_option(key)} {old} or more, or start a new run."
            )
        if old != new:
            grown.append(f"{key} {old} -> {new}")
    if found.finished and not grown:
        more = f" Pass a larger {' or '.join(_option(k) for k in sorted(extendable))} to extend it, or" if extendable else ""
        raise SpectraError(
            f"{found.path} is a finished run; there is nothing to resume.{more} start a new run without --resume "
            "(or with --out naming a new directory)."
        )
    lock = RunLock.acquire(found.directory)
    try:
        if found.finished:
            checkpoint, published = _finished_checkpoint(found.path, verify_first=True)
            try:
                os.replace(found.path, partial_of(found.path))
            except OSError as err:
                raise SpectraError(f"Cannot reopen {found.path} to extend it: {reason(err)}. {fix(err, found.path)} "
                                   "and run the command again.") from err
            lock.moved_to(partial_of(found.path))
        else:
            checkpoint, published = _read_checkpoint(found.directory)
        partial = partial_of(found.path)
        for directory in (partial, partial / CHECKPOINTS_DIR, partial / STATE_DIR):
            _remove_strays(directory, set(), suffix=TMP_SUFFIX)
        stored = _read_json(partial / CONFIG_FILE, partial)
        stored["config"] = options
        resumed = {"at": now(), "command_line": list(sys.argv), "from": checkpoint.progress or "the start"}
        if grown:
            resumed["extended"] = grown
        stored.setdefault("provenance", {}).setdefault("resumed", []).append(resumed)
        try:
            _write_json_atomic(partial / CONFIG_FILE, stored)
        except OSError as err:
            raise SpectraError(f"Cannot update {partial / CONFIG_FILE}: {reason(err)}. {fix(err, partial)} and run the "
                               "command again.") from err
    except BaseException:
        lock.release()
        raise
    writer = RunWriter(found.path, command, options, lock=lock, checkpoint=checkpoint, published=published)
    return writer, checkpoint


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str] = frozenset(),
                   keys: Iterable[str] | None = None) -> list[str]:
    """'key: old -> new' for every option (nested ones as ``a.b``) that differs, among ``keys`` (default all) less ``ignore``."""
    flat_old, flat_new = flatten_options(old), flatten_options(new)
    chosen = set(flat_old) | set(flat_new) if keys is None else set(keys)

    def show(options: Mapping[str, Any], key: str) -> str:
        return json.dumps(options[key]) if key in options else "(unset)"

    def ignored(key: str) -> bool:
        return any(key == name or key.startswith(f"{name}.") for name in ignore)

    return [f"{key}: {show(flat_old, key)} -> {show(flat_new, key)}" for key in sorted(chosen)
            if not ignored(key) and ((key in flat_old) != (key in flat_new) or flat_old.get(key) != flat_new.get(key))]


def flatten_options(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested option dicts as one level with dotted keys (``general.items_per_task``), values as JSON data."""
    flat: dict[str, Any] = {}
    for key, value in jsonable(options).items():
        if isinstance(value, dict) and value:
            flat.update(flatten_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class LazyTensors(Mapping[str, torch.Tensor]):
    """Read-only name -> tensor view of a safetensors file that loads each tensor only when asked for."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            self._keys: list[str] = []
        else:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    self._keys = sorted(handle.keys())
            except (OSError, SafetensorError) as err:
                raise SpectraError(f"{path} is not a readable safetensors file ({err}). Restore it from a copy, or run "
                                   "the command again into a new directory.") from err

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
    #: the extra tables the run holds (name -> rows), e.g. {"samples": 2600}
    tables: Mapping[str, int] = field(default_factory=dict)

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES_DIR

    def rounds(self, arm: str | None = None) -> list[int]:
        """The rounds the run's rows cover (of one arm when given), ascending; empty for a run without rounds."""
        rows = self.rows if arm is None or "arm" not in self.rows else self.rows[self.rows["arm"] == arm]
        if "round" not in rows:
            return []
        return sorted(int(r) for r in rows["round"].dropna().unique())

    def ss_index(self) -> pd.DataFrame:
        """One row per stored SS matrix: side, arm, round, site (the tensor names parsed)."""
        return pd.DataFrame(list(filter(None, map(parse_ss_key, self.tensors))), columns=["side", "arm", "round", "site"])

    def ss_rounds(self, arm: str, side: str = "right", site: str | None = None) -> list[int]:
        """The rounds whose SS matrices the run stored for ``arm`` and ``side`` (and ``site``), ascending."""
        index = self.ss_index()
        chosen = index[(index["arm"] == arm) & (index["side"] == side)]
        if site is not None:
            chosen = chosen[chosen["site"] == site]
        return sorted(int(r) for r in chosen["round"].unique())

    def ss(self, arm: str, side: str, round: int, site: str) -> torch.Tensor:
        """The stored SS matrix (k x r) of ``site`` after ``round`` in ``arm``; a missing one names those stored."""
        key = ss_key(side, arm, round, site)
        if key not in self.tensors:
            index = self.ss_index()
            raise SpectraError(
                f"The run {self.path} stored no SS matrix for arm {arm!r}, side {side!r}, round {round}, site {site!r}. "
                f"It has arms {sorted(set(index['arm'])) or 'none'}, sites {sorted(set(index['site'])) or 'none'} and, "
                f"for this arm and side, rounds {self.ss_rounds(arm, side) or 'none'} (drift stores every --ss-every "
                "rounds and the last)."
            )
        return self.tensors[key]

    def table(self, name: str) -> pd.DataFrame:
        """The extra table ``name`` (``samples``: one row per scored prompt, written by ``--log-samples``)."""
        if name not in self.tables:
            have = f"it holds {', '.join(self.tables)}" if self.tables else "it holds none"
            hint = " (run drift with --log-samples to keep them)" if name == "samples" else ""
            raise SpectraError(f"The run {self.path} has no {name!r} table{hint}; {have}.")
        return _read_rows_csv(self.path / f"{name}.csv")



def load_run(run_dir: Path) -> Run:
    """Read a finished run directory, every file verified against status.json; anything else is a SpectraError saying what to do."""
    path = Path(run_dir)
    if not path.is_dir():
        partial = partial_of(path)
        if partial.is_dir():
            if live_writer(partial) is not None:
                raise SpectraError(f"The run {path} is not finished yet: {busy_message(partial)}")
            raise SpectraError(
                f"The run {path} did not finish: only its partial directory {partial} exists (the run was "
                f"interrupted). Continue it with --resume {path}, or delete {partial}."
            )
        raise SpectraError(f"No run directory at {path}. Pass a directory created by a spectra command (under runs/).")
    status_file = path / STATUS_FILE
    if not status_file.is_file():
        if path.name.endswith(PARTIAL_SUFFIX) or (path / CHECKPOINT_FILE).is_file():
            raise SpectraError(
                f"{path} is an unfinished run (it has no '{STATUS_FILE}'). Continue it with --resume {run_of(path)}, "
                "or run the command again."
            )
        raise SpectraError(
            f"{path} is not a spectra run directory: it has no '{STATUS_FILE}' (and no {CONFIG_FILE} or checkpoint of "
            "an unfinished run). Pass a directory created by a spectra command; they are under runs/ unless --out "
            "named another place."
        )
    status = _read_json(status_file, path)
    if not status.get("complete"):
        raise SpectraError(f"{path} is not marked complete in its {STATUS_FILE}. Run the command again into a new directory.")
    try:
        _verify_files(path, status)
    except _Damaged as damaged:
        raise SpectraError(
            f"The run {path} is damaged: {damaged}. spectra reads no damaged run, so nothing was drawn or summarised "
            "from it. Restore the file from a copy, or run the command again into a new directory."
        ) from None
    stored = _read_json(path / CONFIG_FILE, path)
    rows = _read_rows(path)
    if "rows" in status and len(rows) != int(status["rows"]):
        raise SpectraError(
            f"The run {path} is damaged: its rows file holds {len(rows)} rows, but {STATUS_FILE} records "
            f"{status['rows']}. Restore the file from a copy, or run the command again into a new directory."
        )
    tensors_file = path / TENSORS_FILE
    if status.get("tensors") and not tensors_file.is_file():
        raise SpectraError(
            f"The run {path} is damaged: {TENSORS_FILE} is missing, but {STATUS_FILE} records {status['tensors']} "
            "tensors. Restore the file from a copy, or run the command again into a new directory."
        )
    return Run(
        path=path,
        command=stored.get("command", ""),
        config=stored.get("config", {}),
        provenance=stored.get("provenance", {}),
        rows=rows,
        tensors=LazyTensors(tensors_file if tensors_file.is_file() else None),
        tables=dict(status.get("tables") or {}),
    )


class _Damaged(Exception):
    """A checkpoint or run file that fails its checks; the message names the file and what is wrong."""


def _check_entry(directory: Path, entry: Mapping[str, Any]) -> None:
    """Raise _Damaged unless ``entry['file']`` exists with the recorded size and sha256."""
    name = entry["file"]
    path = directory / name
    if not path.is_file():
        raise _Damaged(f"{name} is missing")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise _Damaged(f"{name} holds {size} bytes, but {entry['bytes']} were written (it was truncated or overwritten)")
    if _digest(path)[0] != entry["sha256"]:
        raise _Damaged(f"{name} does not match the checksum recorded when it was written (its contents changed)")


def _verify_files(directory: Path, status: Mapping[str, Any]) -> None:
    """Check every file a finished run's status.json lists (runs written before checksums list none)."""
    files = status.get("files", {})
    if not isinstance(files, dict):
        raise _Damaged(f"{STATUS_FILE} lists its files in an unknown form")
    for name, entry in files.items():
        if not isinstance(entry, dict) or entry.get("file") != name or "sha256" not in entry:
            raise _Damaged(f"{STATUS_FILE} has a malformed entry for {name}")
        _check_entry(directory, entry)


def _load_manifest(partial: Path, name: str) -> dict[str, Any] | None:
    """A checkpoint manifest with every file it lists verified; None when absent, _Damaged when anything fails."""
    path = partial / name
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Damaged(f"{name} cannot be read ({err})") from None

    def entry_ok(entry: object) -> bool:
        return isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)

    if not (isinstance(manifest, dict) and isinstance(manifest.get("round"), int) and entry_ok(manifest.get("rows"))
            and isinstance(manifest.get("tensor_shards"), list) and all(map(entry_ok, manifest["tensor_shards"]))
            and isinstance(manifest.get("state"), dict) and all(map(entry_ok, manifest["state"].values()))
            and isinstance(manifest.get("tables", {}), dict)
            and all(isinstance(shards, list) and all(map(entry_ok, shards)) for shards in manifest.get("tables", {}).values())):
        raise _Damaged(f"{name} is not a checkpoint manifest that this version of spectra wrote")
    table_entries = [entry for shards in manifest.get("tables", {}).values() for entry in shards]
    for entry in [manifest["rows"], *manifest["tensor_shards"], *manifest["state"].values(), *table_entries]:
        try:
            _check_entry(partial, entry)
        except _Damaged as damaged:
            raise _Damaged(f"{damaged} (listed in {name})") from None
    return manifest


def _checkpoint_from_manifest(partial: Path, manifest: Mapping[str, Any]) -> tuple[Checkpoint, _Published]:
    """Load the rows, tensors and state a verified manifest lists."""
    rows = _read_rows_csv(partial / manifest["rows"]["file"])
    if len(rows) != manifest["rows"].get("rows", len(rows)):
        raise _Damaged(f"{manifest['rows']['file']} holds {len(rows)} rows, but {manifest['rows']['rows']} were written")
    tensors: dict[str, torch.Tensor] = {}
    for shard in manifest["tensor_shards"]:
        tensors.update(load_file(str(partial / shard["file"])))
    state = {name: load_file(str(partial / entry["file"])) for name, entry in manifest["state"].items()}
    tables = {}
    for name, shards in manifest.get("tables", {}).items():
        frames = []
        for shard in shards:
            frame = _read_rows_csv(partial / shard["file"])
            if len(frame) != shard.get("rows", len(frame)):
                raise _Damaged(f"{shard['file']} holds {len(frame)} rows, but {shard['rows']} were written")
            frames.append(frame)
        tables[name] = pd.concat(frames, ignore_index=True)
    checkpoint = Checkpoint(round=manifest["round"], rows=rows, tensors=tensors, state=state,
                            meta=dict(manifest.get("meta") or {}), progress=str(manifest.get("progress", "")),
                            tables=tables)
    published = _Published(manifest["rows"], list(manifest["tensor_shards"]), dict(manifest["state"]),
                           {name: list(shards) for name, shards in manifest.get("tables", {}).items()})
    return checkpoint, published


def _finished_checkpoint(directory: Path, verify_first: bool = True) -> tuple[Checkpoint, None]:
    """A finished run's files (status.json, rows, tensors, state/) as the checkpoint a continuation starts from.

    Returns no published entries: the writer rewrites all of it into its first checkpoint, so no
    checkpoint ever refers to the files that ``finalize`` replaces.
    """
    status = _read_json(directory / STATUS_FILE, directory)
    if verify_first:
        try:
            _verify_files(directory, status)
        except _Damaged as damaged:
            raise SpectraError(
                f"Cannot continue {directory}: {damaged}. Restore the file from a copy, or start a new run."
            ) from None
    if not isinstance(status.get("files"), dict) or ROWS_CSV not in status["files"]:
        raise SpectraError(f"{directory} was written by an older spectra without checksums and cannot be continued; "
                           "start a new run.")
    tensors = load_file(str(directory / TENSORS_FILE)) if TENSORS_FILE in status["files"] else {}
    state = {Path(name).stem: load_file(str(directory / name)) for name in status["files"]
             if name.startswith(f"{STATE_DIR}/")}
    tables = {name: _read_rows_csv(directory / f"{name}.csv") for name in status.get("tables", {})}
    checkpoint = Checkpoint(round=status.get("round"), rows=_read_rows_csv(directory / ROWS_CSV), tensors=tensors,
                            state=state, meta=dict(status.get("meta") or {}), progress=str(status.get("progress", "")),
                            tables=tables)
    return checkpoint, None


def _read_checkpoint(partial: Path) -> tuple[Checkpoint, _Published | None]:
    """The newest intact snapshot of a partial run: checkpoint.json, else finished files, else checkpoint.previous.json.

    Every file is verified first. Falling back says so in ``Checkpoint.note``; when files exist
    but none is intact, the run is refused, since resuming from damaged data would finish it silently.
    A run that never checkpointed starts from the beginning (round None).
    """
    problems: list[str] = []

    def current() -> tuple[Checkpoint, _Published | None] | None:
        manifest = _load_manifest(partial, CHECKPOINT_FILE)
        if manifest is None and (partial / PREVIOUS_CHECKPOINT_FILE).is_file():
            raise _Damaged(f"{CHECKPOINT_FILE} is missing")
        return None if manifest is None else _checkpoint_from_manifest(partial, manifest)

    def finished() -> tuple[Checkpoint, _Published | None] | None:
        if not (partial / STATUS_FILE).is_file():
            return None
        try:
            status = json.loads((partial / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _Damaged(f"{STATUS_FILE} cannot be read ({err})") from None
        if not status.get("complete"):
            return None
        _verify_files(partial, status)
        return _finished_checkpoint(partial, verify_first=False)

    def previous() -> tuple[Checkpoint, _Published | None] | None:
        manifest = _load_manifest(partial, PREVIOUS_CHECKPOINT_FILE)
        return None if manifest is None else _checkpoint_from_manifest(partial, manifest)

    sources = ((current, "its last checkpoint"), (finished, "the files it had finished writing"),
               (previous, "the checkpoint before the last one"))
    for load, what in sources:
        try:
            found = load()
        except _Damaged as damaged:
            problems.append(str(damaged))
            continue
        if found is not None:
            checkpoint, published = found
            if problems or load is finished:
                damage = f" because {'; '.join(problems)}" if problems else ""
                checkpoint.note = (f"Continuing {partial} from {what} ({checkpoint.progress}){damage}; "
                                   "no damaged file is used.")
            return checkpoint, published
    if problems:
        raise SpectraError(
            f"Cannot resume {partial}: its checkpoints are damaged ({'; '.join(problems)}) and no earlier one is "
            f"intact. spectra does not finish a run from damaged data: delete {partial} and run the command again."
        )
    return Checkpoint(round=None, rows=pd.DataFrame(), tensors={}, state={}), _Published()


def _option(key: str) -> str:
    """An option key as the command line spells it (``rounds`` -> ``--rounds``)."""
    return "--" + key.replace("_", "-")


def _remove_strays(directory: Path, keep: set[str], prefix: str = "", suffix: str = "") -> None:
    """Delete files in ``directory`` (ending in ``suffix``) whose ``prefix + name`` is not in ``keep``."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.is_file() and path.name.endswith(suffix) and f"{prefix}{path.name}" not in keep:
            path.unlink(missing_ok=True)


def _rows_csv(rows: pd.DataFrame, tail: Sequence[str] = ("metric", "value")) -> bytes:
    """Rows as CSV bytes with the ``tail`` columns last (``metric`` and ``value``: easier to read)."""
    if len(rows.columns):
        last = [c for c in tail if c in rows.columns]
        rows = rows[[c for c in rows.columns if c not in last] + last]
    buffer = StringIO()
    rows.to_csv(buffer, index=False)
    return buffer.getvalue().encode("utf-8")


def _read_rows_csv(path: Path) -> pd.DataFrame:
    """Rows read back exactly as written (round-trip float parsing; text columns as strings)."""
    try:
        return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, float_precision="round_trip")
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _read_rows(directory: Path) -> pd.DataFrame:
    if (directory / ROWS_PARQUET).is_file() and find_spec("pyarrow") is not None:
        return pd.read_parquet(directory / ROWS_PARQUET)
    return _read_rows_csv(directory / ROWS_CSV)


def _read_json(path: Path, run: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpectraError(f"{run} is damaged: cannot read {path.name} ({err}). Run the command again into a new "
                           "directory.") from err
    if not isinstance(data, dict):
        raise SpectraError(f"{run} is damaged: {path.name} does not hold a JSON object. Run the command again into a "
                           "new directory.")
    return data


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes so a reader sees either the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """JSON through ``_write_bytes_atomic``."""
    _write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


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
