"""A run folder that cannot be corrupted or mislabelled (issue 16, items 1, 2 and 7): every reproduction of the
issue through the command line (``main.main``), with the exit code, the one error line and the folder afterwards.

RUN = a run folder written with ``--output-dir``, SD = RUN/seed1993; the config is a tiny 3-task RanPAC run."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from tests.conftest import terminal_lines
from test_sparse_tuning import tiny_overrides
from utils.errors import UserError
from utils.run_folder import OutputError, RunLock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def images(image_folder) -> Path:
    return image_folder("cub", "test", n_classes=6, train_per_class=4, test_per_class=4, noise=40.0, n_colours=2)


def sets(images: Path, *extra: str) -> list[str]:
    out = []
    for item in [*tiny_overrides(images, "ranpac", init_cls=2, increment=2, spr="none"), *extra]:
        out += ["--set", item]
    return out


def start(images: Path, tmp_path: Path, *extra: str) -> Path:
    """A run stopped after task 0 (``stop_after_task=0``); returns SD."""
    assert main.main(["--output-dir", str(tmp_path / "runs"), *sets(images, "stop_after_task=0", *extra)]) == 0
    (sd,) = (tmp_path / "runs").glob("*/*/seed*")
    return sd


def resume(sd: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main.main(["--resume", str(sd.parent), *extra])
    return code, terminal_lines(capsys.readouterr().err)


def results_of(sd: Path) -> dict:
    return json.loads((sd / "results.json").read_text())


@pytest.fixture
def uninterrupted(images, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full")
    assert main.main(["--output-dir", str(out), *sets(images)]) == 0
    return json.loads(next(out.rglob("results.json")).read_text())


def test_a_missing_checkpoint_restarts_the_seed_with_the_partial_results_moved_aside(images, tmp_path, capsys,
                                                                                    uninterrupted):
    sd = start(images, tmp_path)
    (sd / "checkpoint.pt").unlink()
    code, err = resume(sd, capsys, "--set", "stop_after_task=null")
    assert code == 0 and err == []
    after = results_of(sd)
    assert [t["task"] for t in after["tasks"]] == [0, 1, 2] and after["status"] == "complete"  # not [0, 0, ...]
    assert after["accuracy_matrix"] == uninterrupted["accuracy_matrix"]
    (partial,) = sd.glob("results.partial-*.json")
    assert [t["task"] for t in json.loads(partial.read_text())["tasks"]] == [0]  # kept, not appended to
    assert "were moved to" in (next(sd.glob("*.log"))).read_text()


def test_a_truncated_checkpoint_restarts_the_seed_and_every_later_resume_works(images, tmp_path, capsys,
                                                                              uninterrupted):
    sd = start(images, tmp_path)
    data = (sd / "checkpoint.pt").read_bytes()
    (sd / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    code, err = resume(sd, capsys, "--set", "stop_after_task=1")
    assert code == 0 and [t["task"] for t in results_of(sd)["tasks"]] == [0, 1]
    assert len(list(sd.glob("checkpoint.unreadable-*.pt"))) == 1 and len(list(sd.glob("results.partial-*"))) == 1
    code, err = resume(sd, capsys, "--set", "stop_after_task=null")
    assert code == 0 and results_of(sd)["accuracy_matrix"] == uninterrupted["accuracy_matrix"]


def test_a_write_killed_before_the_first_checkpoint_leaves_no_stuck_seed(images, tmp_path, capsys, uninterrupted):
    sd = start(images, tmp_path)
    (sd / "checkpoint.pt").replace(sd / "checkpoint.pt.tmp")  # as if killed while writing the first checkpoint
    (sd / "checkpoint.pt.tmp").write_bytes((sd / "checkpoint.pt.tmp").read_bytes()[:1000])
    results = results_of(sd)
    (sd / "results.json").write_text(json.dumps({**results, "status": "running"}))  # kill -9: no final status
    code, _ = resume(sd, capsys, "--set", "stop_after_task=null")
    assert code == 0 and not list(sd.glob("*.tmp"))  # the stale temporary is gone
    assert results_of(sd)["accuracy_matrix"] == uninterrupted["accuracy_matrix"]


@pytest.mark.parametrize("key,value", [("mi_epochs", 7), ("shuffle", False), ("select_rate", 0.5), ("M", 32)])
def test_a_hand_edited_config_is_refused(images, tmp_path, capsys, key, value):
    sd = start(images, tmp_path)
    saved = json.loads((sd / "config.json").read_text())
    saved["config"][key] = value
    (sd / "config.json").write_text(json.dumps(saved))
    before = (sd / "results.json").read_bytes()
    code, err = resume(sd, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --resume")
    assert "config.json" in err[0] and "edited" in err[0]
    assert (sd / "results.json").read_bytes() == before  # nothing lost, nothing relabelled


def test_a_seed_added_by_hand_is_refused(images, tmp_path, capsys):
    sd = start(images, tmp_path)
    saved = json.loads((sd / "config.json").read_text())
    saved["seeds"] = [1993, 7]
    (sd / "config.json").write_text(json.dumps(saved))
    code, err = resume(sd, capsys)
    assert code == 2 and len(err) == 1 and "seed list" in err[0]
    assert not (sd.parent / "seed7").exists()


def test_a_checkpoint_of_another_seed_or_config_is_refused(images, tmp_path, capsys):
    sd = start(images, tmp_path)
    other = start(images, tmp_path / "b", "seed=[7]")  # another seed: same config otherwise
    own, before = (sd / "checkpoint.pt").read_bytes(), (sd / "results.json").read_bytes()
    (sd / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    code, err = resume(sd, capsys)
    assert code == 2 and len(err) == 1 and "written for seed 7" in err[0] and "checkpoint.pt" in err[0]
    assert (sd / "results.json").read_bytes() == before  # still "interrupted", not "failed"
    rate = start(images, tmp_path / "c", "select_rate=0.5")
    (sd / "checkpoint.pt").write_bytes((rate / "checkpoint.pt").read_bytes())
    code, err = resume(sd, capsys)
    assert code == 2 and len(err) == 1 and "another config" in err[0]
    assert (sd / "results.json").read_bytes() == before
    (sd / "checkpoint.pt").write_bytes(own)
    assert resume(sd, capsys)[0] == 0  # its own checkpoint resumes


@pytest.mark.parametrize("next_task", [99, -1, 2])
def test_a_checkpoint_with_an_altered_task_counter_is_refused(images, tmp_path, capsys, next_task):
    sd = start(images, tmp_path)
    state = torch.load(sd / "checkpoint.pt", weights_only=True)
    state["next_task"] = next_task
    torch.save(state, sd / "checkpoint.pt")
    code, err = resume(sd, capsys)
    assert code == 2 and len(err) == 1 and f"next_task is {next_task}" in err[0] and "checkpoint.pt" in err[0]


def test_a_checkpoint_with_bad_results_json_is_one_line_naming_the_file(images, tmp_path, capsys):
    sd = start(images, tmp_path)
    state = torch.load(sd / "checkpoint.pt", weights_only=True)
    state["results"] = "{not json"
    torch.save(state, sd / "checkpoint.pt")
    code, err = resume(sd, capsys)
    assert code == 2 and len(err) == 1 and "checkpoint.pt" in err[0] and "results cannot be read" in err[0]


def test_a_hand_set_complete_status_does_not_skip_the_remaining_tasks(images, tmp_path, capsys, uninterrupted):
    sd = start(images, tmp_path)
    (sd / "results.json").write_text(json.dumps({**results_of(sd), "status": "complete", "complete": True}))
    code, _ = resume(sd, capsys)
    assert code == 0 and results_of(sd)["accuracy_matrix"] == uninterrupted["accuracy_matrix"]


HOLDER = """import sys, time
from utils.run_folder import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds RUN/.lock (``RunLock``) until it is killed; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_resume_of_a_folder_in_use_is_refused_and_a_killed_holder_does_not_block(images, tmp_path, capsys):
    sd = start(images, tmp_path)
    before = (sd / "results.json").read_bytes()
    holder = hold_lock(sd.parent)
    try:
        code, err = resume(sd, capsys)
        assert code == 2 and len(err) == 1 and f"{sd.parent} is in use by process {holder.pid}" in err[0]
        assert (sd / "results.json").read_bytes() == before  # still "interrupted", not "failed"
    finally:
        holder.kill()  # SIGKILL: no clean-up, its lock file stays behind
        holder.wait()
        holder.stdout.close()
    assert (sd.parent / ".lock").read_text() == str(holder.pid)
    code, _ = resume(sd, capsys)
    assert code == 0 and results_of(sd)["status"] == "complete" and not (sd.parent / ".lock").exists()


def test_a_lock_that_is_a_directory_is_one_line_and_leaves_the_folder_as_it_was(images, tmp_path, capsys):
    sd = start(images, tmp_path)
    before = (sd / "results.json").read_bytes()
    (sd.parent / ".lock").mkdir()
    code, err = resume(sd, capsys)
    assert code == 2 and len(err) == 1 and f"the lock {sd.parent / '.lock'} is a directory" in err[0]
    assert "rmdir" in err[0] and (sd / "results.json").read_bytes() == before and (sd.parent / ".lock").is_dir()


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path):
    (tmp_path / ".lock").symlink_to(os.devnull)  # every process could "lock" /dev/null
    with pytest.raises(OutputError, match="is not a regular file; remove it"):
        RunLock(tmp_path).__enter__()


@pytest.mark.parametrize("text", ["ppid", "", "not a pid"])
def test_a_leftover_lock_file_does_not_block_whatever_it_says(tmp_path, text):
    """The pid-file lock of earlier versions, or a lock file of a killed process: nobody holds it."""
    (tmp_path / ".lock").write_text(str(os.getppid()) if text == "ppid" else text)  # ppid: a live process
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not lock.held and not (tmp_path / ".lock").exists()


def test_a_held_lock_refuses_a_second_taker_and_is_free_after_release(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(OutputError, match=f"{tmp_path} is in use by process {os.getpid()}"):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path) as lock:
        assert lock.held


def test_a_disabled_lock_takes_nothing(tmp_path):
    with RunLock(tmp_path, enabled=False) as lock:
        assert not lock.held and not (tmp_path / ".lock").exists()


RACES = 1000


def racer(lock_class: type, folders: list[Path], barrier, record: Path) -> None:
    """One racing process. At each race it starts with the others (``barrier``) and tries the lock; inside, it
    creates ``inside`` in the folder exclusively (the file exists already if another racer is inside too) and stays
    until every racer has tried. It records per race: "I" inside alone, "B" inside with another, "R" refused."""
    marks = []
    for folder in folders:
        barrier.wait(timeout=60)
        try:
            with lock_class(folder):
                try:
                    os.close(os.open(folder / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    marks.append("I")
                except FileExistsError:
                    marks.append("B")
                barrier.wait(timeout=60)
        except UserError:
            marks.append("R")
            barrier.wait(timeout=60)
    record.write_text("".join(marks))


def race(lock_class: type, root: Path, races: int, leftover: bool, racers: int = 2) -> dict[str, int]:
    """Race ``racers`` processes over ``lock_class`` in ``races`` folders, each fresh or holding a leftover lock file
    (the pid of a process that has ended); returns how many races had two racers inside, or none."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = [root / f"race{i}" for i in range(races)]
    for folder in folders:
        folder.mkdir()
        if leftover:
            (folder / ".lock").write_text(str(dead.pid))
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(racers)
    records = [root / f"racer{i}.txt" for i in range(racers)]
    procs = [ctx.Process(target=racer, args=(lock_class, folders, barrier, rec)) for rec in records]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0] * racers
    per_race = list(zip(*(rec.read_text() for rec in records)))
    assert len(per_race) == races
    inside = [sum(mark != "R" for mark in marks) for marks in per_race]
    return {"races": races, "two inside": sum(n > 1 for n in inside), "none inside": inside.count(0),
            "overlap seen": sum("B" in marks for marks in per_race)}


@pytest.mark.parametrize("leftover", [False, True], ids=["fresh-folder", "leftover-lock-file"])
def test_racing_processes_never_hold_the_lock_together(tmp_path, leftover):
    tally = race(RunLock, tmp_path, RACES, leftover)
    assert tally == {"races": RACES, "two inside": 0, "none inside": 0, "overlap seen": 0}


def churner(lock_class: type, folder: Path, rounds: int, record: Path) -> None:
    """One process taking and releasing the lock of ``folder`` ``rounds`` times as fast as it can; inside, it creates
    ``inside`` exclusively and deletes it before leaving. Records per round "I" inside alone, "B" inside with another,
    "R" refused."""
    marks = []
    for _ in range(rounds):
        try:
            with lock_class(folder):
                try:
                    os.close(os.open(folder / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    marks.append("I")
                    (folder / "inside").unlink()
                except FileExistsError:
                    marks.append("B")
        except UserError:
            marks.append("R")
    record.write_text("".join(marks))


def churn(lock_class: type, root: Path, rounds: int, racers: int = 2) -> dict[str, int]:
    """``racers`` processes taking and releasing one folder's lock ``rounds`` times each (the lock file is deleted
    and created again all the time); returns the rounds inside and the overlaps seen."""
    ctx = multiprocessing.get_context("fork")
    records = [root / f"churner{i}.txt" for i in range(racers)]
    procs = [ctx.Process(target=churner, args=(lock_class, root, rounds, rec)) for rec in records]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0] * racers
    marks = "".join(rec.read_text() for rec in records)
    return {"rounds": len(marks), "inside": len(marks) - marks.count("R"), "overlap seen": marks.count("B")}


def test_processes_taking_and_releasing_one_lock_never_hold_it_together(tmp_path):
    tally = churn(RunLock, tmp_path, RACES)
    assert tally["rounds"] == 2 * RACES and tally["inside"] > 0 and tally["overlap seen"] == 0


def test_output_dir_with_resume_is_refused(images, tmp_path, capsys):
    sd = start(images, tmp_path)
    code, err = resume(sd, capsys, "--output-dir", str(tmp_path / "elsewhere"))
    assert code == 2 and len(err) == 1 and "--output-dir" in err[0]
    assert results_of(sd)["status"] == "interrupted"


@pytest.mark.parametrize("blocker", ["file", "read-only"])
def test_an_output_folder_that_cannot_be_written_says_only_what_is_true(images, tmp_path, capsys, blocker):
    out = tmp_path / "out"
    if blocker == "file":
        out.write_text("a file where the folder should be")
    else:
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
    try:
        capsys.readouterr()
        code = main.main(["--output-dir", str(out), *sets(images)])
        err = terminal_lines(capsys.readouterr().err)
    finally:
        if blocker != "file":
            out.chmod(0o700)
    assert code == 2 and len(err) == 1 and "cannot create the run folder" in err[0]
    assert "failed" not in err[0] and not list(tmp_path.rglob("results.json"))


def test_a_full_disk_during_the_checkpoint_names_the_file(images, tmp_path, capsys, monkeypatch):
    import trainer

    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1234 vs 1000")
    monkeypatch.setattr(trainer.torch, "save", full)
    capsys.readouterr()
    code = main.main(["--output-dir", str(tmp_path / "runs"), *sets(images)])
    err = terminal_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "cannot write the checkpoint" in err[0] and "checkpoint.pt" in err[0]
    (sd,) = (tmp_path / "runs").glob("*/*/seed1993")
    assert not list(sd.glob("*.tmp")) and results_of(sd)["status"] == "failed" and len(results_of(sd)["tasks"]) == 1


# ---- the data a run started with (issue 26) ----------------------------------------------------------------------
@pytest.mark.parametrize("change", ["delete", "add", "replace"])
def test_a_resume_refuses_changed_data_naming_the_difference(images, tmp_path, capsys, change):
    sd = start(images, tmp_path)
    before = (sd / "results.json").read_bytes()
    assert json.loads(before)["data"]["train"]["per_class"] == [4] * 6
    folder = images / "cub" / "train" / "class_03"
    victim = sorted(folder.glob("*.png"))[0]
    if change == "delete":
        victim.unlink()
    elif change == "add":
        (folder / "extra.png").write_bytes(victim.read_bytes())
    else:
        victim.write_bytes(victim.read_bytes() + b"\0" * 16)  # the same name, another size
    code, err = resume(sd, capsys)
    assert code == 2 and len(err) == 1 and "the data changed since the run started" in err[0], err
    if change in ("delete", "add"):
        assert ("class 3: 4 then, 3 now" if change == "delete" else "class 3: 4 then, 5 now") in err[0]
    else:
        assert "other files or contents" in err[0]
    assert (sd / "results.json").read_bytes() == before  # the refusal changes nothing


def test_stop_after_task_beyond_the_last_task_is_warned(images, tmp_path, capsys):
    assert main.main(["--output-dir", str(tmp_path / "runs"), *sets(images, "stop_after_task=7")]) == 0
    assert "stop_after_task = 7: the run has 3 tasks (0-2)" in capsys.readouterr().err


def test_a_data_root_that_is_a_file_is_refused(images, tmp_path, capsys):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("")
    assert main.main(["--output-dir", str(tmp_path / "runs"), *sets(images, f"data_root={not_a_folder}")]) == 2
    err = terminal_lines(capsys.readouterr().err)
    assert len(err) == 1 and "'data_root'" in err[0] and "a file" in err[0]
    assert not (tmp_path / "runs").exists()
