"""searchrl.workspace: presets and overrides run in runs/<name>/ without touching params.yaml."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from searchrl.errors import ConfigError
from searchrl.workspace import links_for, make_workspace, resolve_preset

DVC = [sys.executable, "-m", "dvc"]

GRAPH = {
    "stages": {
        "make": {
            "cmd": "python -c \"import pathlib, yaml; p = yaml.safe_load(open('params.yaml'));"
                   " pathlib.Path('out').mkdir(exist_ok=True);"
                   " pathlib.Path('out/v.txt').write_text(str(p['evaluate']['top_k']))\"",
            "deps": ["lib/code.py"],
            "params": ["evaluate"],
            "outs": ["${evaluate.out_dir}"],  # templated output, literal dependency below
        },
        "use": {
            "cmd": "python -c \"import pathlib; pathlib.Path('used.txt').write_text(open('out/v.txt').read())\"",
            "deps": ["out", "lib"],
            "metrics": [{"used.txt": {"cache": False}}],
        },
    }
}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A git repo shaped like the project: params.yaml, dvc.yaml, configs/, code, runs/ git-ignored."""
    root = tmp_path / "proj"
    (root / "configs").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "lib" / "code.py").write_text("x = 1\n")
    (root / "params.yaml").write_text("seed: 0\nevaluate:\n  top_k: 5\n  max_questions: 0\n  out_dir: out\n")
    (root / "configs" / "tiny.yaml").write_text("evaluate:\n  max_questions: 4\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump(GRAPH, sort_keys=False))
    (root / ".gitignore").write_text("/runs/\n")
    (root / ".dvcignore").write_text("/runs\n__pycache__\n*.pyc\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=root, check=True, env=env)
    monkeypatch.delenv("SEARCHRL_RUNS_DIR", raising=False)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return root


def test_no_preset_no_overrides_is_the_root(project):
    assert make_workspace(None, [], root=project) == project.resolve()
    assert not (project / "runs").exists()


def test_preset_and_overrides_materialise_a_workspace(project):
    before = (project / "params.yaml").read_text()
    ws = make_workspace("configs/tiny.yaml", ["evaluate.top_k=7"], root=project)
    assert ws == (project / "runs" / "tiny").resolve()
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["evaluate"] == {"top_k": 7, "max_questions": 4, "out_dir": "out"}
    assert params["seed"] == 0
    assert (project / "params.yaml").read_text() == before  # the user's file is untouched
    assert not (project / "out").exists()
    assert (ws / ".dvc" / "config").exists()
    conf = (ws / ".dvc" / "config").read_text()
    assert "no_scm = True" in conf and "analytics = False" in conf


def test_overrides_alone_use_runs_custom(project):
    ws = make_workspace(None, ["evaluate.top_k=2"], root=project)
    assert ws.name == "custom"
    assert yaml.safe_load((ws / "params.yaml").read_text())["evaluate"]["top_k"] == 2


def test_runs_dir_can_move(project, tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHRL_RUNS_DIR", str(tmp_path / "elsewhere"))
    ws = make_workspace("configs/tiny.yaml", [], root=project)
    assert ws == (tmp_path / "elsewhere" / "tiny").resolve()
    assert (ws / "lib").resolve() == (project / "lib").resolve()


def test_dvc_yaml_is_a_copy_and_code_deps_are_links_to_the_project(project):
    ws = make_workspace("configs/tiny.yaml", [], root=project)
    assert (ws / "dvc.yaml").read_text() == (project / "dvc.yaml").read_text()
    assert (ws / ".dvcignore").read_text() == (project / ".dvcignore").read_text()
    assert (ws / "lib").is_symlink() and not os.path.isabs(os.readlink(ws / "lib"))
    assert (ws / "lib" / "code.py").read_text() == "x = 1\n"
    assert sorted(p.name for p in ws.iterdir()) == [".dvc", ".dvcignore", "dvc.yaml", "lib", "params.yaml"]
    assert not (ws / "out").exists()  # artifacts are the workspace's own


def test_links_stop_above_pipeline_artifacts():
    P = PurePosixPath
    produced = {P("data/prepared/train.parquet"), P("data/index"), P("reports/b.json"), P("models/sft")}
    deps = {P("searchrl/data"), P("tasks/a.py"), P("data/raw/in.jsonl"), P("data/prepared"),
            P("data/prepared/train.parquet"), P("data/index"), P("models/sft"), P("searchrl/agent")}
    assert links_for(deps, produced) == ["data/raw", "searchrl", "tasks"]


def test_stale_links_into_the_project_are_dropped(project):
    ws = make_workspace("configs/tiny.yaml", [], root=project)
    (ws / "out").symlink_to(project / "lib")  # e.g. left by an older graph: outputs would leak
    make_workspace("configs/tiny.yaml", [], root=project)
    assert not (ws / "out").exists() and (ws / "lib").is_symlink()


def test_bad_override_is_one_clear_error_and_creates_nothing(project):
    with pytest.raises(ConfigError, match=r"unknown key 'evaluate.topk'.*did you mean 'top_k'"):
        make_workspace("configs/tiny.yaml", ["evaluate.topk=3"], root=project)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        make_workspace(None, ["evaluate.top_k"], root=project)
    assert not (project / "runs").exists()


def test_unknown_preset_lists_the_known_ones(project):
    with pytest.raises(ConfigError, match=r"preset 'nope.yaml': file not found .*tiny"):
        make_workspace("nope.yaml", [], root=project)
    assert resolve_preset("tiny", project) == (project / "configs" / "tiny.yaml").resolve()


def test_rewriting_is_idempotent(project):
    ws = make_workspace("configs/tiny.yaml", [], root=project)
    stamps = {p: p.lstat().st_mtime_ns
              for p in (ws / "params.yaml", ws / "dvc.yaml", ws / ".dvc" / "config", ws / "lib")}
    assert make_workspace("configs/tiny.yaml", [], root=project) == ws
    assert {p: p.lstat().st_mtime_ns for p in stamps} == stamps


def test_dvc_rejects_ignored_dvc_yaml_but_accepts_the_nested_workspace(project):
    """Why the workspace is its own no-SCM DVC repo; and that DVC tracks it like any project."""
    plain = project / "runs" / "plain"
    plain.mkdir(parents=True)
    (plain / "dvc.yaml").write_text((project / "dvc.yaml").read_text())
    bad = subprocess.run([*DVC, "repro"], cwd=plain, capture_output=True, text=True)
    assert bad.returncode != 0 and re.search(r"(git|dvc)-ignored", bad.stdout + bad.stderr)

    ws = make_workspace("configs/tiny.yaml", [], root=project)
    first = subprocess.run([*DVC, "repro"], cwd=ws, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (ws / "used.txt").read_text() == "5"
    again = subprocess.run([*DVC, "repro"], cwd=ws, capture_output=True, text=True)
    assert "Stage 'make' didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout

    (project / "lib" / "__pycache__").mkdir()  # bytecode does not make stages stale (.dvcignore)
    (project / "lib" / "__pycache__" / "code.cpython-311.pyc").write_bytes(b"\0")
    quiet = subprocess.run([*DVC, "status"], cwd=ws, capture_output=True, text=True)
    assert "up to date" in quiet.stdout, quiet.stdout

    (project / "lib" / "code.py").write_text("x = 2\n")  # a code change in the project reruns here
    third = subprocess.run([*DVC, "repro"], cwd=ws, capture_output=True, text=True)
    assert "Running stage 'make'" in third.stdout and "Running stage 'use'" in third.stdout

    ws = make_workspace("configs/tiny.yaml", ["evaluate.top_k=9"], root=project)  # a param change too
    fourth = subprocess.run([*DVC, "repro"], cwd=ws, capture_output=True, text=True)
    assert "Running stage 'make'" in fourth.stdout
    assert (ws / "used.txt").read_text() == "9"

    root_status = subprocess.run([*DVC, "status"], cwd=project, capture_output=True, text=True)
    assert root_status.returncode == 0  # the root project skips the nested one
    assert "runs/tiny" not in root_status.stdout


def test_raw_input_files_become_prepare_deps_and_an_edit_reruns_prepare(project, tmp_path):
    """A jsonl source's files live outside the pipeline (../shared/data); the workspace's prepare stage
    depends on them, so editing one makes DVC rerun prepare (and nothing else changed is up to date)."""
    raw = tmp_path / "raw" / "eval.jsonl"
    raw.parent.mkdir()
    raw.write_text('{"question": "q?", "answer": "a"}\n')
    graph = {"stages": {"prepare": {"cmd": f"python -c \"import shutil; shutil.copy('{raw}', 'copy.jsonl')\"",
                                    "deps": ["lib/code.py"], "outs": ["copy.jsonl"]}}}
    (project / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))
    (project / "configs" / "local.yaml").write_text(
        f"prepare:\n  source: jsonl\n  jsonl:\n    eval:\n      - {{path: {raw}, format: r1searcher}}\n")
    ws = make_workspace("configs/local.yaml", [], root=project)
    deps = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]
    assert deps == ["lib/code.py", str(raw.resolve())]
    assert sorted(p.name for p in ws.iterdir()) == [".dvc", ".dvcignore", "dvc.yaml", "lib", "params.yaml"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([*DVC, "repro", "-q"], cwd=ws, check=True, env=env)
    status = subprocess.run([*DVC, "status"], cwd=ws, check=True, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout
    raw.write_text('{"question": "q?", "answer": "b"}\n')
    status = subprocess.run([*DVC, "status"], cwd=ws, check=True, env=env, capture_output=True, text=True)
    assert "prepare:" in status.stdout and str(raw.resolve()) in status.stdout


MAKE = """
import sys
from pathlib import Path
from searchrl.workspace import make_workspace
print(make_workspace("configs/tiny.yaml", sys.argv[2:], root=Path(sys.argv[1])))
"""


def test_concurrent_runs_create_one_workspace_without_errors(project):
    """Three processes creating the same preset workspace at once (a fresh one: DVC init included)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", MAKE, str(project)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in results]
    assert "Traceback" not in "".join(e for _, e in results)
    ws = (project / "runs" / "tiny").resolve()
    assert {o.strip().splitlines()[-1] for o, _ in results} == {str(ws)}
    assert sorted(p.name for p in ws.iterdir()) == [".dvc", ".dvcignore", "dvc.yaml", "lib", "params.yaml"]
    assert sorted(p.name for p in ws.parent.iterdir()) == [".tiny.lock", "tiny"]  # no temp files
    ok = subprocess.run([*DVC, "status"], cwd=ws, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr


def test_a_run_holding_the_workspace_makes_the_next_one_wait(project):
    import time

    from searchrl.workspace import workspace_lock

    first = make_workspace("configs/tiny.yaml", [], root=project)
    with workspace_lock(first, project):
        # a second run with other overrides must not rewrite params.yaml under the first one's stages
        second = subprocess.Popen([sys.executable, "-c", MAKE, str(project), "evaluate.top_k=9"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert second.poll() is None
        assert yaml.safe_load((first / "params.yaml").read_text())["evaluate"]["top_k"] == 5
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "in use by another run; waiting" in err
    assert yaml.safe_load((first / "params.yaml").read_text())["evaluate"]["top_k"] == 9


def test_workspaces_share_the_projects_dvc_cache(project, monkeypatch, tmp_path):
    """Every workspace's DVC cache (and with it the run-cache) is the project's own, or
    SEARCHRL_DVC_CACHE: searchrl.runcache restores a stage one workspace ran in another."""
    from dvc.config import Config

    monkeypatch.delenv("SEARCHRL_DVC_CACHE", raising=False)
    a = make_workspace("configs/tiny.yaml", [], root=project)
    b = make_workspace(None, ["evaluate.top_k=3"], root=project)
    for ws in (a, b):
        assert Path(Config(dvc_dir=str(ws / ".dvc"))["cache"]["dir"]) == (project / ".dvc" / "cache").resolve()

    monkeypatch.setenv("SEARCHRL_DVC_CACHE", str(tmp_path / "elsewhere"))
    a = make_workspace("configs/tiny.yaml", [], root=project)  # refreshed: the setting follows the variable
    assert Path(Config(dvc_dir=str(a / ".dvc"))["cache"]["dir"]) == (tmp_path / "elsewhere").resolve()
