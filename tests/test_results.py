"""Run directories: round trips, atomic completion, checkpoints and resume."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from spectra import results
from spectra.errors import SpectraError
from spectra.results import (
    Checkpoint,
    Run,
    create_run,
    jsonable,
    load_run,
    parse_ss_key,
    resume_run,
    ss_key,
)

CONFIG = {"model": "tiny", "seed": 3, "dtype": "float32", "device": "cpu", "rounds": 4, "taus": (0.5, 0.9), "out": None}


def _rows(round_: int) -> list[dict]:
    return [
        {"experiment": "drift", "arm": arm, "round": round_, "site": "mlp.down@2", "metric": "LS", "value": 1.0 - 0.1 * round_}
        for arm in ("off", "revive")
    ]


def test_round_trip_rows_tensors_config(tmp_path: Path) -> None:
    """What a run writes is what load_run reads back: options, provenance, rows and tensors."""
    ss = torch.rand(3, 8)
    original = ss.clone()
    rows = pd.DataFrame(_rows(0) + _rows(1) + [{"task": "sst2", "round": 1, "arm": "off", "metric": "accuracy", "value": 0.5}])
    with create_run("drift", CONFIG, root=tmp_path) as writer:
        writer.add_rows(rows)
        writer.add_tensors({ss_key("right", "off", 1, "mlp.down@2"): ss})
        ss.zero_()  # the run keeps its own copy
    run = load_run(writer.path)
    assert isinstance(run, Run) and run.path == writer.path and run.command == "drift"
    assert run.path.parent == tmp_path and run.path.name.endswith("-drift")
    assert run.config == jsonable(CONFIG)
    assert run.provenance["seed"] == 3 and run.provenance["dtype"] == "float32"
    assert run.provenance["versions"]["torch"] and run.provenance["versions"]["spectra"]
    assert {"python", "platform", "git_commit", "started", "command_line"} <= set(run.provenance)
    expected = rows[[c for c in rows.columns if c not in ("metric", "value")] + ["metric", "value"]]
    pd.testing.assert_frame_equal(run.rows, expected, check_dtype=False)
    assert list(run.tensors) == [ss_key("right", "off", 1, "mlp.down@2")]
    assert torch.equal(run.tensors["ss/right/off/round=1/mlp.down@2"], original)
    assert json.loads((run.path / "status.json").read_text())["complete"] is True


def test_ss_key_round_trip() -> None:
    """ss_key and parse_ss_key agree, and other tensor names are not SS keys."""
    assert parse_ss_key(ss_key("left", "revive", 12, "attn.o@3")) == ("left", "revive", 12, "attn.o@3")
    assert parse_ss_key("delta/mlp.down@2") is None


def test_dataclass_config_and_explicit_out(tmp_path: Path) -> None:
    """A dataclass config is stored as plain JSON; an existing --out is refused."""

    @dataclass
    class Options:
        seed: int = 0
        path: Path = Path("x")

    out = tmp_path / "mine"
    create_run("probe", Options(), out=out).finalize()
    assert load_run(out).config == {"seed": 0, "path": "x"}
    with pytest.raises(SpectraError, match="already exists"):
        create_run("probe", Options(), out=out)


def test_interrupted_run_leaves_nothing_complete(tmp_path: Path) -> None:
    """An exception before finalize leaves only a '.partial' directory, which load_run refuses clearly."""
    with pytest.raises(RuntimeError, match="boom"):
        with create_run("drift", CONFIG, out=tmp_path / "run") as writer:
            writer.add_rows(_rows(0))
            raise RuntimeError("boom")
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run.partial"]
    assert not (tmp_path / "run.partial" / "status.json").exists()
    with pytest.raises(SpectraError, match="did not finish"):
        load_run(tmp_path / "run")
    with pytest.raises(SpectraError, match="is an unfinished run"):
        load_run(tmp_path / "run.partial")
    with pytest.raises(SpectraError, match="No run directory"):
        load_run(tmp_path / "elsewhere")


def test_resume_reads_last_checkpoint(tmp_path: Path) -> None:
    """Resume returns the last checkpointed round, its rows, tensors and state, and finishes into a complete run."""
    out = tmp_path / "run"
    writer = create_run("drift", CONFIG, out=out)
    for round_ in range(3):
        writer.add_rows(_rows(round_))
        writer.add_tensors({ss_key("right", "off", round_, "mlp.down@2"): torch.full((2, 4), float(round_))})
        writer.checkpoint(round_, state={"editor": {"cov": torch.eye(3) * round_}})
    writer.add_rows(_rows(3))  # round 3 never checkpointed: the "crash"
    del writer

    resumed, checkpoint = resume_run(out, "drift", {**CONFIG, "out": str(out), "resume": True})
    assert isinstance(checkpoint, Checkpoint) and checkpoint.round == 2
    assert sorted(checkpoint.rows["round"].unique()) == [0, 1, 2] and len(checkpoint.rows) == 6
    assert sorted(checkpoint.tensors) == [ss_key("right", "off", r, "mlp.down@2") for r in range(3)]
    assert torch.equal(checkpoint.state["editor"]["cov"], torch.eye(3) * 2)
    resumed.add_rows(_rows(3))
    resumed.add_tensors({ss_key("right", "off", 3, "mlp.down@2"): torch.zeros(2, 4)})
    resumed.checkpoint(3)
    resumed.finalize()
    run = load_run(out)
    assert sorted(run.rows["round"].unique()) == [0, 1, 2, 3] and len(run.rows) == 8
    assert len(run.tensors) == 4 and torch.equal(run.tensors[ss_key("right", "off", 1, "mlp.down@2")], torch.ones(2, 4))
    assert not (out / "checkpoints").exists() and len(run.provenance["resumed"]) == 1


def test_resume_before_any_checkpoint_starts_over(tmp_path: Path) -> None:
    """A run that crashed before its first checkpoint resumes from the start (round None, no rows)."""
    create_run("drift", CONFIG, out=tmp_path / "run")
    _, checkpoint = resume_run(tmp_path / "run.partial", "drift", CONFIG)
    assert checkpoint.round is None and checkpoint.rows.empty and checkpoint.tensors == {}


def test_resume_with_different_config_fails(tmp_path: Path) -> None:
    """Changed options (or another command, or a finished run) are refused with a SpectraError."""
    out = tmp_path / "run"
    create_run("drift", CONFIG, out=out).checkpoint(0)
    with pytest.raises(SpectraError, match=r"rounds: 4 -> 5"):
        resume_run(out, "drift", {**CONFIG, "rounds": 5})
    with pytest.raises(SpectraError, match="'drift' run"):
        resume_run(out, "probe", CONFIG)
    with pytest.raises(SpectraError, match="No run at"):
        resume_run(tmp_path / "other", "drift", CONFIG)
    finished = create_run("drift", CONFIG, out=tmp_path / "done")
    finished.finalize()
    with pytest.raises(SpectraError, match="nothing to resume"):
        resume_run(tmp_path / "done", "drift", CONFIG)


def test_checkpoint_keeps_only_files_in_force(tmp_path: Path) -> None:
    """Each checkpoint keeps the files of itself and the one before (the fallback), and every tensor shard still needed."""
    writer = create_run("drift", CONFIG, out=tmp_path / "run")
    for round_ in range(3):
        writer.add_tensors({f"t{round_}": torch.zeros(1)})
        writer.checkpoint(round_, state={"editor": {"x": torch.zeros(1)}})
    names = sorted(p.name.split("-")[0] for p in (writer.partial_path / "checkpoints").iterdir())
    assert names == ["rows", "rows", "state", "state", "tensors", "tensors", "tensors"]
    previous = json.loads((writer.partial_path / "checkpoint.previous.json").read_text())
    assert previous["round"] == 1 and len(previous["tensor_shards"]) == 2


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    """A second writer, fresh or resuming, is refused with the live process named; the lock goes with the writer."""
    out = tmp_path / "run"
    writer = create_run("drift", CONFIG, out=out)
    writer.checkpoint(0)
    for attempt in (lambda: create_run("drift", CONFIG, out=out), lambda: resume_run(out, "drift", CONFIG)):
        with pytest.raises(SpectraError, match=f"being written by process {os.getpid()}"):
            attempt()
    writer.close()
    resumed, checkpoint = resume_run(out, "drift", CONFIG)
    assert checkpoint.round == 0
    resumed.finalize()
    assert not (out / ".lock").exists() and load_run(out).path == out


def test_a_write_failure_names_the_cause_and_the_intact_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk during a checkpoint leaves the previous checkpoint in force and says how to resume."""
    writer = create_run("drift", CONFIG, out=tmp_path / "run")
    writer.add_rows(_rows(0))
    writer.checkpoint(0, progress="round 0")

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "_write_bytes_atomic", full)
    writer.add_rows(_rows(1))
    with pytest.raises(SpectraError, match=r"No space left on device \(ENOSPC\).*\(round 0\) is intact.*--resume"):
        writer.checkpoint(1, progress="round 1")
    monkeypatch.undo()
    writer.close()
    _, checkpoint = resume_run(tmp_path / "run", "drift", CONFIG)
    assert checkpoint.progress == "round 0" and len(checkpoint.rows) == 2


def test_extra_tables_are_checkpointed_in_shards_resumed_and_finished(tmp_path: Path) -> None:
    """samples.csv: each checkpoint writes only the rows added since the last; resume reads them all back."""
    out = tmp_path / "run"
    writer = create_run("drift", CONFIG, out=out)
    for round_ in range(2):
        writer.add_table_rows("samples", [{"arm": "off", "round": round_, "case_id": i, "success": 1.0} for i in range(3)])
        writer.checkpoint(round_)
    writer.add_table_rows("samples", [{"arm": "off", "round": 2, "case_id": 0, "success": 0.0}])  # never checkpointed
    del writer
    shards = json.loads((tmp_path / "run.partial" / "checkpoint.json").read_text())["tables"]["samples"]
    assert [shard["rows"] for shard in shards] == [3, 3]
    resumed, checkpoint = resume_run(out, "drift", CONFIG)
    assert len(checkpoint.tables["samples"]) == 6 and len(resumed.table("samples")) == 6
    resumed.add_table_rows("samples", [{"arm": "off", "round": 2, "case_id": 0, "success": 0.0}])
    resumed.checkpoint(2)
    resumed.finalize()
    run = load_run(out)
    samples = run.table("samples")
    assert run.tables == {"samples": 7} and samples["round"].tolist() == [0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(SpectraError, match="no 'other' table"):
        run.table("other")
    (out / "samples.csv").write_text("arm,round\n")
    with pytest.raises(SpectraError, match="samples.csv"):
        load_run(out)
