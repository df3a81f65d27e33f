"""One knob changed, only what depends on it runs: workspaces share one DVC cache and DVC's run-cache
(searchrl.runcache), so a fresh `--set rl.lr=...` workspace after a completed run checks prepare,
index, sample and sft out of the cache instead of recomputing them.

The project here is a temp copy of the real one with tiny stages: the real params.yaml and the real
dvc.yaml stage graph (every stage, its deps, params and outputs with their persist / cache / metric /
plot flags, the foreach ablations), where each command is replaced by a script that writes the
stage's declared outputs in a fraction of a second from its inputs and params and logs that it ran.
So the test checks the real graph's stages for run-cache eligibility (an uncached non-metric output
added to sft would make it fail), through the real flow (Prefect tasks -> `dvc repro` per stage)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

FAKE_STAGE = r'''"""Write every output named on the command line from the inputs and params named there."""
import hashlib, json, os, pathlib, sys

args = sys.argv[1:]
name, outs, deps, sections = args[0], [], [], []
target = None
for a in args[1:]:
    if a in ("--outs", "--deps", "--params"):
        target = {"--outs": outs, "--deps": deps, "--params": sections}[a]
    else:
        target.append(a)


def digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        h.update(str(f.relative_to(path) if f != path else "").encode() + f.read_bytes())
    return h.hexdigest()[:12]


import yaml
params = yaml.safe_load(open("params.yaml"))
record = json.dumps({"stage": name, "params": {s: params.get(s.split(".")[0]) for s in sections},
                     "inputs": {d: digest(pathlib.Path(d)) for d in deps if not d.startswith(("searchrl", "tasks"))}},
                    sort_keys=True, default=str)
for out in outs:
    p = pathlib.Path(out)
    if p.suffix:  # a file
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(record)
    else:         # a directory (an index, a model)
        p.mkdir(parents=True, exist_ok=True)
        (p / "content.json").write_text(record)
with open(os.environ["FAKE_STAGE_LOG"], "a") as log:
    log.write(pathlib.Path.cwd().name + " " + name + "\n")
'''


def paths_of(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def tiny_graph(real: dict) -> dict:
    """The real graph, every command replaced by FAKE_STAGE writing the stage's declared outputs."""
    graph = json.loads(json.dumps(real))
    for name, stage in graph["stages"].items():
        body = stage.get("do", stage)
        outs = [p for key in ("outs", "metrics", "plots") for p in paths_of(body.get(key))]
        params = [p for p in body.get("params", []) if isinstance(p, str)]
        label = f"{name}@${{key}}" if "do" in stage else name
        body["cmd"] = " ".join(["python fake_stage.py", label, "--outs", *outs, "--deps", *paths_of(body["deps"]),
                                "--params", *params])
        body["deps"] = [*body["deps"], "fake_stage.py"]
    return graph


@pytest.fixture
def project(tmp_path, pipeline_env, monkeypatch) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    for name in ("params.yaml", ".dvcignore"):
        (root / name).write_text((PROJECT_ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    for name in ("searchrl", "tasks"):  # the stages' code dependencies, hashed by DVC as in the real project
        (root / name).symlink_to(PROJECT_ROOT / name, target_is_directory=True)
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    real = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    (root / "dvc.yaml").write_text(yaml.safe_dump(tiny_graph(real), sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    monkeypatch.setenv("SEARCHRL_ROOT", str(root))
    monkeypatch.setenv("FAKE_STAGE_LOG", str(tmp_path / "ran.log"))
    # the default: workspaces share the project's own cache (pipeline_env points tests elsewhere)
    monkeypatch.delenv("SEARCHRL_DVC_CACHE", raising=False)
    return root


def run(overrides: list[str], stages: list[str]) -> dict:
    from flows.pipeline import searchrl_pipeline

    return searchrl_pipeline(overrides=overrides, stages=stages)


def test_a_new_workspace_for_one_knob_runs_only_what_depends_on_it(project, prefect_api, tmp_path):
    from flows.pipeline import dvc_stages

    stages = [s for s in dvc_stages(project) if s != "evaluate"]  # evaluate's table.md: see the last lines
    upstream = ["prepare", "index", "sample", "sft"]
    training = [s for s in stages if s == "rl" or s.startswith("rl_ablation@")]
    assert stages == upstream + training and len(training) >= 2

    first = run([], stages)  # `make run` in the project root
    assert first["ran"] == stages and first["restored"] == []

    lr = run(["rl.lr=3.0e-05"], stages)  # `python -m flows.pipeline --set rl.lr=3e-5`: runs/custom/
    ws = Path(lr["workspace"])
    assert ws == tmp_path / "runs" / "custom"
    assert lr["restored"] == upstream  # checked out of the shared cache, not run
    assert lr["ran"] == training       # the rl section is a param of every RL stage
    ran_log = (tmp_path / "ran.log").read_text().split("\n")
    assert sum(line.startswith("custom ") for line in ran_log) == len(training)
    for out in ("data/prepared/train.parquet", "data/index/content.json", "data/sft/trajectories.jsonl",
                "models/sft/content.json", "reports/sft/metrics.json", "data/prepared/stats.json"):
        assert (ws / out).read_text() == (project / out).read_text(), out  # the root run's outputs, metrics too
    assert json.loads((ws / "models/rl/content.json").read_text())["params"]["rl"]["lr"] == 3.0e-05
    status = subprocess.run([sys.executable, "-m", "dvc", "status", *stages], cwd=ws, capture_output=True,
                            text=True, check=True)
    assert "up to date" in status.stdout  # dvc.lock records the restored stages like run ones

    again = run(["rl.lr=3.0e-05"], stages)
    assert again["ran"] == [] and again["restored"] == []

    sft = run(["sft.lr=5.0e-05"], stages)  # the same workspace (runs/custom/), another knob
    assert sft["restored"] == [] and sft["ran"] == ["sft", *training]  # upstream: up to date there

    back = run(["rl.lr=3.0e-05"], stages)  # back to the earlier value: everything restored, nothing run
    assert back["ran"] == [] and back["restored"] == ["sft", *training]

    # evaluate has an uncached output besides metrics and plots (table.md): DVC never saves a run-cache
    # entry for such a stage, so it runs in every new workspace (it is the last stage, and it depends on
    # every RL model anyway)
    from dvc.repo import Repo

    from searchrl.runcache import eligible

    with Repo(str(project)) as repo:
        assert {s.name for s in repo.index.stages if eligible(s)} == set(stages)
