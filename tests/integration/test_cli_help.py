"""Every command-line entry point answers `--help` with its usage and starts no work.

Entry points are found, not listed: every module under searchrl/, tasks/ and flows/ (run as
`python -m <module>`) and every script under bench/ and scripts/ (`python bench/<name>.py`) that has an
`if __name__ == "__main__":` block, so a new one is covered the day it is added. Each runs in an empty
directory with the pipeline's state (workspaces, MLflow, Prefect) pointed into a temp dir; afterwards
that directory is still empty, no state was created, and bench/results/ is unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, pipeline_env_vars

MAIN_GUARD = 'if __name__ == "__main__":'


def entry_points() -> list[tuple[str, list[str]]]:
    """(name, argv prefix) of every runnable module and bench script."""
    found = []
    for package in ("searchrl", "tasks", "flows"):
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            if MAIN_GUARD in path.read_text(encoding="utf-8"):
                module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
                found.append((module, ["-m", module]))
    for folder in ("bench", "scripts"):
        for path in sorted((PROJECT_ROOT / folder).glob("*.py")):
            if MAIN_GUARD in path.read_text(encoding="utf-8"):
                found.append((f"{folder}/{path.name}", [str(path)]))
    return found


def test_the_entry_points_are_found():
    names = {name for name, _ in entry_points()}
    stages = {"tasks.prepare", "tasks.index", "tasks.sample", "tasks.sft", "tasks.rl", "tasks.evaluate"}
    assert stages | {"flows.pipeline", "flows.deploy", "searchrl.launch", "bench/bench_search.py",
                     "scripts/install_torch.py"} <= names


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name, argv", entry_points(), ids=[name for name, _ in entry_points()])
def test_help_prints_usage_and_starts_nothing(name, argv, tmp_path):
    cwd, state = tmp_path / "cwd", tmp_path / "state"
    cwd.mkdir()
    env = {**os.environ, **pipeline_env_vars(state), "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("PREFECT_API_URL", None)
    results = snapshot(PROJECT_ROOT / "bench" / "results")

    out = subprocess.run([sys.executable, *argv, "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)

    assert out.returncode == 0, f"{name} --help exited {out.returncode}:\n{out.stderr[-3000:]}"
    assert out.stdout.lstrip().startswith("usage:"), f"{name} --help printed no usage line:\n{out.stdout[:500]}"
    assert "Traceback" not in out.stderr
    assert not any(cwd.iterdir()), f"{name} --help wrote {sorted(p.name for p in cwd.iterdir())}"
    # `import prefect` creates its (empty) home directory; nothing else of the pipeline's state may appear
    written = [p for p in state.rglob("*") if p != state / "prefect"] if state.exists() else []
    assert not written, f"{name} --help wrote {written}"
    assert snapshot(PROJECT_ROOT / "bench" / "results") == results


@pytest.mark.parametrize("module", ["tasks.prepare", "tasks.sft"])
def test_a_stage_rejects_an_unknown_argument_in_one_line(module, tmp_path):
    out = subprocess.run([sys.executable, "-m", module, "--no-such-option"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.returncode == 2
    assert "unrecognized arguments: --no-such-option" in out.stderr.splitlines()[-1]
    assert not any(tmp_path.iterdir())
