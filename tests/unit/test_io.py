"""searchrl.io: atomic publishing leaves nothing behind, even after a process was killed mid-publish."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from searchrl.io import atomic_path, pid_alive, sweep_stale, write_json

KILLED_MID_PUBLISH = """
import os, signal, sys
from searchrl.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.mkdir()
    (tmp / "weights.bin").write_bytes(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(proc.stdout)
    assert not pid_alive(pid)
    return pid


def test_a_publish_killed_midway_is_swept_by_the_next_one(tmp_path):
    final = tmp_path / "model"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_PUBLISH, str(final)])
    assert killed.returncode == -9
    [left] = tmp_path.iterdir()
    assert re.fullmatch(r"\.model\.tmp-\d+", left.name) and (left / "weights.bin").is_file()

    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"y")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (final / "weights.bin").read_bytes() == b"y"


def test_sweep_removes_only_dead_processes_temp_paths_of_that_name(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".out.old-{dead}").write_text("old")
    (tmp_path / f".out.tmp-{alive}").write_text("a live writer's")  # still being written: kept
    (tmp_path / f".other.tmp-{dead}").write_text("another output's")  # another name: not ours to sweep
    (tmp_path / ".out.tmp-notapid").write_text("")
    removed = sweep_stale(tmp_path / "out")
    assert sorted(p.name for p in removed) == sorted([f".out.tmp-{dead}", f".out.old-{dead}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".out.tmp-{alive}", f".other.tmp-{dead}", ".out.tmp-notapid"])


def test_write_json_sweeps_too(tmp_path):
    (tmp_path / f".m.json.tmp-{dead_pid()}").write_text("{")
    write_json(tmp_path / "m.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_pid_alive():
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid()) and not pid_alive(0)
