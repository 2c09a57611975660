"""Fault injection on a tiny-world model: runs stopped, killed, starved of disk, corrupted or raced end correctly or clearly.

Every scenario ends in the rows and tensors of an uninterrupted run or in a one-paragraph error
(exit status 2, or 128 + signal for a stopped run) that names the file and the fix; none prints a
traceback. Stops are injected deterministically (an exception right after a checkpoint is
published, a signal sent to this process, an OSError from the writer); one test kills a real
writer process with SIGKILL while another tries to use its run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from spectra import results
from spectra.editing.loop import EditLoop
from spectra.errors import SpectraError
from spectra.results import RunWriter, create_run, load_run, resume_run, ss_key
from spectra_cli.main import app

runner = CliRunner()
TIMING = ("seconds_edit", "seconds_observe")
#: checkpoint progress in the order a 2-round, 2-arm run publishes them
PROGRESS = [f"round {r} of arm '{arm}' (arm {i + 1} of 2)" for i, arm in enumerate(("off", "revive")) for r in range(3)]


class Killed(BaseException):
    """Stands in for SIGKILL right after a checkpoint: nothing of the process runs afterwards but lock release."""


def drift_args(world_model: Path, out: Path, rounds: int = 2) -> list[str]:
    """A cheap drift run on the fixture model (tiny counts; two held-out prompts exercise the representation state)."""
    return ["drift", "--model", str(world_model), "--stats-corpus", str(world_model / "small_corpus.txt"),
            "--rounds", str(rounds), "--batch-size", "2", "--eval-records", "4", "--items-per-task", "4",
            "--represent-prompts", "2", "--out", str(out)]


def invoke(*args: str, code: int = 0) -> str:
    """Run the CLI in-process; assert its exit status, that no traceback escaped, and return its output."""
    result = runner.invoke(app, list(args))
    output = result.output
    assert result.exit_code == code, output + repr(result.exception)
    assert "Traceback" not in output
    if code:
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return output


def kill_after_checkpoints(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make the next run 'die' right after publishing its ``count``-th checkpoint."""
    original = RunWriter.checkpoint
    written = {"n": 0}

    def checkpoint_then_die(self: RunWriter, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        written["n"] += 1
        if written["n"] == count:
            raise Killed

    monkeypatch.setattr(RunWriter, "checkpoint", checkpoint_then_die)


def progress_of(out: Path) -> str:
    return json.loads((Path(f"{out}.partial") / "checkpoint.json").read_text())["progress"]


def comparable(path: Path) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """A finished run's rows without the timing rows, and its tensors."""
    run = load_run(path)
    rows = run.rows[~run.rows["metric"].isin(TIMING)].reset_index(drop=True)
    return rows, {name: run.tensors[name] for name in run.tensors}


def assert_same_run(path: Path, reference: Path, sort: bool = False) -> None:
    """Rows (timing aside) and tensors identical, bit for bit; ``sort`` ignores row order (an extended run appends)."""
    (rows, tensors), (expected, expected_tensors) = comparable(path), comparable(reference)
    if sort:
        keys = [c for c in ("arm", "round", "site", "side", "task", "prompt_idx", "metric") if c in rows]
        rows = rows.sort_values(keys, kind="stable").reset_index(drop=True)
        expected = expected.sort_values(keys, kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, expected, check_exact=True)
    assert sorted(tensors) == sorted(expected_tensors)
    assert all(torch.equal(tensors[name], expected_tensors[name]) for name in tensors)


def skip_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs draw no figures: they are not under test here and take most of a small run's time."""
    monkeypatch.setattr("spectra.plots.plot_run", lambda path: [])


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_figures(monkeypatch)


@pytest.fixture(scope="module")
def uninterrupted(world_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Finished runs of 2 and 3 rounds that nothing interrupted: what every recovery must reproduce."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        skip_figures(patch)
        for rounds in (2, 3):
            invoke(*drift_args(world_model, directory / f"r{rounds}", rounds))
    return {rounds: directory / f"r{rounds}" for rounds in (2, 3)}


@pytest.fixture(scope="module")
def stopped(world_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed right after its fourth checkpoint (round 0 of arm 'revive'), so that two checkpoints are on disk."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as patch:
        skip_figures(patch)
        kill_after_checkpoints(patch, 4)
        with pytest.raises(Killed):
            runner.invoke(app, drift_args(world_model, out))
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("no_figures")
def test_a_run_killed_after_any_checkpoint_resumes_to_the_same_rows_and_tensors(world_model, uninterrupted, tmp_path,
                                                                                 monkeypatch):
    """Killed after each kind of checkpoint in turn (both arms, round 0 and later), then resumed with a bare --resume."""
    out = tmp_path / "run"
    for index, expected in enumerate(PROGRESS):
        with monkeypatch.context() as patch:
            kill_after_checkpoints(patch, 1)
            with pytest.raises(Killed):
                runner.invoke(app, drift_args(world_model, out) if index == 0 else ["drift", "--resume", str(out)])
        assert progress_of(out) == expected and not out.exists()
    output = invoke("drift", "--resume", str(out))
    assert f"run directory: {out}" in output
    assert_same_run(out, uninterrupted[2])
    assert not (out / "checkpoints").exists() and not (out / ".lock").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("no_figures")
def test_sigterm_and_sigint_stop_between_writes_and_say_how_to_resume(world_model, uninterrupted, tmp_path,
                                                                       monkeypatch):
    """SIGTERM in mid-round abandons the round; SIGINT during a checkpoint lets it finish first; both resume exactly."""
    out = tmp_path / "run"
    original_observe = EditLoop.observe

    def terminated_in_round_one(self, arm, round):
        if arm.name == "off" and round == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_observe(self, arm, round)

    with monkeypatch.context() as patch:
        patch.setattr(EditLoop, "observe", terminated_in_round_one)
        output = invoke(*drift_args(world_model, out), code=128 + signal.SIGTERM)
    assert "Stopped by SIGTERM" in output and PROGRESS[0] in output and f"spectra drift --resume {out}" in output
    assert progress_of(out) == PROGRESS[0]

    original_write = results._write_json_atomic

    def interrupted_while_writing(path, data):
        if path.name == "checkpoint.json" and data["progress"] == PROGRESS[4]:
            os.kill(os.getpid(), signal.SIGINT)
        original_write(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(results, "_write_json_atomic", interrupted_while_writing)
        output = invoke("drift", "--resume", str(out), code=128 + signal.SIGINT)
    assert "Stopped by SIGINT" in output and PROGRESS[4] in output
    assert progress_of(out) == PROGRESS[4], "the checkpoint being written when the signal came must be complete"
    invoke("drift", "--resume", str(out))
    assert_same_run(out, uninterrupted[2])


@pytest.mark.slow
@pytest.mark.usefixtures("no_figures")
def test_write_failures_keep_the_last_checkpoint_and_say_how_to_resume(world_model, uninterrupted, tmp_path,
                                                                        monkeypatch):
    """ENOSPC in the middle of a checkpoint and EACCES while finishing: a clear error, nothing half-written, exact resume."""
    out = tmp_path / "run"
    original_save = results.save_file
    calls = {"n": 0}

    def disk_full_on_the_eighth_tensor_file(tensors, path):
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        original_save(tensors, path)

    with monkeypatch.context() as patch:
        patch.setattr(results, "save_file", disk_full_on_the_eighth_tensor_file)
        output = invoke(*drift_args(world_model, out), code=2)
    partial = Path(f"{out}.partial")
    intact = progress_of(out)
    assert "No space left on device (ENOSPC)" in output and "Free disk space" in output
    assert f"last complete checkpoint ({intact}) is intact" in output and f"spectra drift --resume {out}" in output
    listed = set()
    for name in ("checkpoint.json", "checkpoint.previous.json"):
        manifest = json.loads((partial / name).read_text())
        listed |= {e["file"] for e in [manifest["rows"], *manifest["tensor_shards"], *manifest["state"].values()]}
    on_disk = {f"checkpoints/{p.name}" for p in (partial / "checkpoints").iterdir()}
    assert on_disk == listed, "the failed checkpoint must leave no file behind"

    original_write = results._write_bytes_atomic

    def read_only_results(path, data):
        if path.name == "results.csv":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        original_write(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(results, "_write_bytes_atomic", read_only_results)
        output = invoke("drift", "--resume", str(out), code=2)
    assert "Permission denied (EACCES)" in output and "writable" in output and PROGRESS[-1] in output
    assert not out.exists() and progress_of(out) == PROGRESS[-1]
    invoke("drift", "--resume", str(out))
    assert_same_run(out, uninterrupted[2])


def _checkpoint_files(partial: Path) -> dict[str, str]:
    """Which file plays which part in the two checkpoints on disk."""
    current = json.loads((partial / "checkpoint.json").read_text())
    previous = json.loads((partial / "checkpoint.previous.json").read_text())
    old_shards = {entry["file"] for entry in previous["tensor_shards"]}
    return {
        "checkpoint.json": "checkpoint.json",
        "current rows": current["rows"]["file"],
        "newest tensor shard": next(e["file"] for e in current["tensor_shards"] if e["file"] not in old_shards),
        "state of the running arm": current["state"]["arm1"]["file"],
        "state of the finished arm (in both)": current["state"]["arm0"]["file"],
        "first tensor shard (in both)": current["tensor_shards"][0]["file"],
    }


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero the tail":
        path.write_bytes(data[: len(data) - 64] + bytes(64))
    else:
        path.unlink()


@pytest.mark.parametrize(("part", "how", "falls_back"), [
    ("checkpoint.json", "truncate", True),
    ("current rows", "truncate", True),
    ("newest tensor shard", "zero the tail", True),
    ("state of the running arm", "delete", True),
    ("state of the finished arm (in both)", "truncate", False),
    ("first tensor shard (in both)", "zero the tail", False),
])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_or_is_refused(stopped, tmp_path, part, how, falls_back):
    """Each checkpoint file damaged in turn: resume uses the previous checkpoint and says so, or refuses; never the damage."""
    out = tmp_path / "run"
    shutil.copytree(f"{stopped}.partial", f"{out}.partial")
    partial = Path(f"{out}.partial")
    name = _checkpoint_files(partial)[part]
    _damage(partial / name, how)
    config = json.loads((partial / "config.json").read_text())["config"]
    if not falls_back:
        with pytest.raises(SpectraError, match="no earlier one is intact") as refused:
            resume_run(out, "drift", {**config, "resume": str(out)}, extendable=frozenset({"rounds"}))
        assert name in str(refused.value) and f"delete {partial}" in str(refused.value)
        return
    writer, checkpoint = resume_run(out, "drift", {**config, "resume": str(out)}, extendable=frozenset({"rounds"}))
    writer.close()
    assert checkpoint.progress == PROGRESS[2] and name in checkpoint.note and "no damaged file is used" in checkpoint.note
    assert set(checkpoint.rows["arm"]) == {"off"} and checkpoint.rows["round"].max() == 2


@pytest.mark.slow
@pytest.mark.usefixtures("no_figures")
def test_resuming_from_the_previous_checkpoint_still_gives_the_same_rows(stopped, uninterrupted, tmp_path):
    """A run whose newest rows file was cut to 100 lines finishes from the checkpoint before it, identical to the reference."""
    out = tmp_path / "run"
    shutil.copytree(f"{stopped}.partial", f"{out}.partial")
    partial = Path(f"{out}.partial")
    rows_file = partial / _checkpoint_files(partial)["current rows"]
    rows_file.write_text("".join(rows_file.read_text().splitlines(keepends=True)[:100]))
    output = invoke("drift", "--resume", str(out))
    assert "the checkpoint before the last one" in output and rows_file.name in output
    assert_same_run(out, uninterrupted[2])


def test_a_damaged_config_or_finished_run_is_refused_with_the_file_named(stopped, tmp_path):
    """config.json garbage: resume refuses; a finished run's truncated rows, garbage or missing tensors: plot refuses."""
    out = tmp_path / "run"
    shutil.copytree(f"{stopped}.partial", f"{out}.partial")
    (Path(f"{out}.partial") / "config.json").write_text("{not json")
    output = invoke("drift", "--resume", str(out), code=2)
    assert "config.json" in output and "damaged" in output

    def finished(name: str) -> Path:
        with create_run("drift", {"seed": 0}, out=tmp_path / name) as writer:
            writer.add_rows([{"arm": "off", "round": r, "metric": "LS", "value": 1.0 / (r + 1)} for r in range(200)])
            writer.add_tensors({ss_key("right", "off", 0, "mlp.down@0"): torch.rand(3, 4)})
        return writer.path

    truncated = finished("truncated")
    lines = (truncated / "results.csv").read_text().splitlines(keepends=True)
    (truncated / "results.csv").write_text("".join(lines[:90]))
    output = invoke("plot", str(truncated), code=2)
    assert "results.csv" in output and "damaged" in output and not (truncated / "figures").exists()
    garbage = finished("garbage")
    (garbage / "tensors.safetensors").write_bytes(b"\x00" * 512)
    assert "tensors.safetensors" in invoke("plot", str(garbage), code=2)
    missing = finished("missing")
    (missing / "tensors.safetensors").unlink()
    assert "tensors.safetensors is missing" in invoke("plot", str(missing), code=2)
    output = invoke("plot", str(tmp_path), code=2)
    assert "not a spectra run directory" in output and "--resume" not in output
    assert f"--resume {out}" in invoke("plot", f"{out}.partial", code=2)


@pytest.mark.slow
def test_a_second_writer_is_refused_by_name_and_a_sigkilled_run_resumes(world_model, uninterrupted, tmp_path,
                                                                        monkeypatch):
    """A live writer process (stopped with SIGSTOP) locks its run; after SIGKILL the same run resumes exactly."""
    out = tmp_path / "live"
    script = "import sys; from spectra_cli.main import main; sys.argv = ['spectra', *sys.argv[1:]]; main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "writer.log", "w") as log:
        writer = subprocess.Popen([sys.executable, "-c", script, *drift_args(world_model, out, rounds=3)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (Path(f"{out}.partial") / "checkpoint.json").is_file():
            assert writer.poll() is None, (tmp_path / "writer.log").read_text()
            assert time.monotonic() < deadline, "the writer never published a checkpoint"
            time.sleep(0.02)
        os.kill(writer.pid, signal.SIGSTOP)
        for args in (["drift", "--resume", str(out)], drift_args(world_model, out, rounds=3)):
            output = invoke(*args, code=2)
            assert f"process {writer.pid}" in output and "is being written by" in output
        assert f"process {writer.pid}" in invoke("plot", str(out), code=2)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    skip_figures(monkeypatch)
    invoke("drift", "--resume", str(out))
    assert_same_run(out, uninterrupted[3])


@pytest.mark.usefixtures("no_figures")
def test_a_finished_run_extends_with_more_rounds_and_only_with_its_own_options(uninterrupted, tmp_path):
    """--rounds may grow (same rows for the rounds done, then an uninterrupted longer run's); other options must match."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[2], out)
    assert "nothing to resume" in invoke("drift", "--resume", str(out), code=2)
    assert "never shortened" in invoke("drift", "--resume", str(out), "--rounds", "1", code=2)
    output = invoke("drift", "--resume", str(out), "--rounds", "3", "--items-per-task", "5", code=2)
    assert "--items-per-task: 4 -> 5" in output and not Path(f"{out}.partial").exists()
    invoke("drift", "--resume", str(out), "--rounds", "3", "--items-per-task", "4", "--editor", "memit")
    assert_same_run(out, uninterrupted[3], sort=True)
    done, _ = comparable(uninterrupted[2])
    now, _ = comparable(out)
    pd.testing.assert_frame_equal(now[now["round"] <= 2].reset_index(drop=True), done, check_exact=True)
    assert json.loads((out / "config.json").read_text())["config"]["rounds"] == 3


def test_damaged_model_files_are_named_before_any_work(world_model, tmp_path):
    """NaN in an attention weight, truncated or foreign safetensors, a directory with only config.json: one paragraph each."""
    def model_copy(name: str) -> Path:
        directory = tmp_path / name
        shutil.copytree(world_model, directory)
        return directory

    nan = model_copy("nan")
    weights = load_file(str(nan / "model.safetensors"))
    weights["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(nan / "model.safetensors"), metadata={"format": "pt"})
    output = invoke(*drift_args(nan, tmp_path / "nan-run"), code=2)
    assert "the attention query projection of layer 1" in output and "model.layers.1.self_attn.q_proj.weight" in output
    assert "Site(" not in output
    assert not (tmp_path / "nan-run").exists() and not (tmp_path / "nan-run.partial").exists()

    truncated = model_copy("truncated")
    size = (truncated / "model.safetensors").stat().st_size
    os.truncate(truncated / "model.safetensors", size // 2)
    output = invoke(*drift_args(truncated, tmp_path / "run"), code=2)
    assert f"{truncated / 'model.safetensors'} is damaged" in output and "truncated" in output
    (truncated / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    assert "is damaged" in invoke("spectrum", "--model", str(truncated), code=2)

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(world_model / "config.json", bare)
    output = invoke("spectrum", "--model", str(bare), code=2)
    assert "no weights" in output and "no tokenizer" in output and "sentencepiece" not in output


def test_bad_counts_are_refused_before_the_model_loads(world_model, tmp_path, monkeypatch):
    """Counts out of range are errors (never a slice, a silent cap or a silent 'off'), and cost no model load."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("spectra.experiments.common.load_model", no_model)
    run = drift_args(world_model, tmp_path / "run")
    for value, needle in (("-5", "at least 1"), ("0", "at least 1"), ("100000", "Ask for between 1 and")):
        output = invoke(*run, "--items-per-task", value, code=2)
        assert "--items-per-task" in output and needle in output
    assert "need" in invoke(*run, "--rounds", "5000", code=2)
    output = invoke("trace", "--model", str(world_model), "--facts", "100000", code=2)
    assert "Trace at most" in output
    assert not list(tmp_path.iterdir())


@pytest.mark.usefixtures("no_figures")
def test_records_the_tokenizer_cannot_represent_are_listed_or_skipped(world_model, tmp_path):
    """Unknown words, a subject that is no whole run of tokens, target_new == target_true: listed, or skipped and counted."""
    records = json.loads((world_model / "counterfact.json").read_text())[:40]
    rewrites = [r["requested_rewrite"] for r in records]
    rewrites[0]["target_new"]["str"] = rewrites[0]["target_true"]["str"]
    rewrites[1]["subject"] = "Qzxv Wplk"
    rewrites[2]["target_new"]["str"] = "qqzzxxvv"
    rewrites[3]["prompt"] = rewrites[3]["prompt"].replace("{}", "{}qq")
    dataset = tmp_path / "bad.json"
    dataset.write_text(json.dumps(records))
    run = [*drift_args(world_model, tmp_path / "run"), "--dataset", str(dataset), "--rounds", "1", "--batch-size", "4"]
    output = invoke(*run, code=2)
    assert "4 of the" in output and "--skip-bad-records" in output
    for case_id, problem in ((0, "target_new equals target_true"), (1, "the tokenizer does not know"),
                             (2, "'qqzzxxvv' holds words"), (3, "not a whole run of tokens")):
        assert f"case_id {records[case_id]['case_id']}: " in output and problem in output
    output = invoke(*run, "--skip-bad-records")
    assert "Skipped 4 records" in output
    provenance = json.loads((tmp_path / "run" / "config.json").read_text())["provenance"]
    assert provenance["skipped_records"]["count"] == 4
