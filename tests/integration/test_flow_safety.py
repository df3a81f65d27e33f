"""`python -m flows.pipeline` as an operator meets it: config mistakes and a tracking server that is
down are one line and exit 2 before any work, secrets passed with --set never reach MLflow, and a
killed flow leaves no Prefect server behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

CHEAP = ["--set", "prepare.knowledge_world.probe.enabled=false", "--stages", "prepare"]


def flow_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.pipeline", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.parametrize("override, expected", [
    ("evaluate.methods=[direct", "override 'evaluate.methods=[direct': the value '[direct' of 'evaluate.methods' "
                                 "is not valid YAML"),
    ("policy.model=smollm2-135m-instrct", "policy.model: 'smollm2-135m-instrct' is not an embedded alias"),
    ("policy.device=gpu", "'policy.device': 'gpu' is not a device (auto, cpu, cuda or cuda:N); did you mean 'cuda'?"),
    pytest.param("policy.device=cuda", "policy.device: 'cuda' but this machine has no CUDA device",
                 marks=pytest.mark.skipif("not no_cuda()", reason="this machine has a CUDA device")),
])
def test_config_mistakes_are_one_line_and_exit_2_before_any_work(pipeline_env, override, expected):
    out = flow_cli("--set", override)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    if "model=" in override:
        assert "did you mean 'smollm2-135m-instruct'?" in lines[0]
    if "[direct" in override:
        assert "did you mean 'evaluate.methods=[direct]'?" in lines[0]
    assert not (pipeline_env / "runs").exists() and not (pipeline_env / "mlflow.db").exists()


@pytest.mark.parametrize("edit, expected", [
    (("  factory: Flat\n", "  factroy: Flat\n"), "error: params.yaml: unknown key 'index.factroy' (did you mean 'factory'?)"),
    (("  factory: Flat\n", "  factory: [Flat\n"), "error: params.yaml:{line}:12: not valid YAML: expected ',' or ']', "
                                                 "but got ':'"),
])
def test_a_typo_in_the_root_params_yaml_is_one_line_before_the_flow(pipeline_env, tmp_path, edit, expected):
    """`make run` (no preset, no --set) reads the project's own params.yaml: its typos are caught like
    a preset's, before any Prefect flow or server, in one line naming the file relative to the project."""
    root = tmp_path / "project"
    root.mkdir()
    text = (PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8")
    assert text.count(edit[0]) == 1
    (root / "params.yaml").write_text(text.replace(*edit), encoding="utf-8")
    (root / "dvc.yaml").write_text((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    line = text[:text.index(edit[0])].count("\n") + 2  # PyYAML stops on the line after the open list
    out = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=root, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "SEARCHRL_ROOT": str(root),
                                           "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip() == expected.format(line=line)
    assert not (root / "mlflow.db").exists() and not (root / ".dvc").exists()
    assert not (pipeline_env / "runs").exists()
    assert not any((pipeline_env / "prefect").glob("*")), "no Prefect server or database was started"


def test_a_stage_names_a_bad_model_key_and_exits_2(pipeline_env, tmp_path):
    """The same check in a DVC stage (`dvc exp run -S policy.model=...` writes params.yaml directly)."""
    (tmp_path / "params.yaml").write_text("policy:\n  model: smollm2-135m-instrct\n")
    out = subprocess.run([sys.executable, "-m", "tasks.sft"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "SEARCHRL_ROOT": str(PROJECT_ROOT)})
    assert out.returncode == 2
    assert "sft: error: policy.model: 'smollm2-135m-instrct' is not an embedded alias" in out.stderr
    assert "Traceback" not in out.stderr and not (pipeline_env / "mlflow.db").exists()


def test_a_finished_flow_exits_at_once_without_log_errors(pipeline_env):
    """The temporary Prefect server is stopped only after Prefect's workers sent the flow's last log lines
    (flows/server.py deliver_pending): before, they retried against the stopped server for over a minute
    after "Finished in state Completed()" and then printed "Error logging to API"."""
    import datetime as dt
    import re

    out = flow_cli("--preset", "configs/smoke.yaml", *CHEAP, timeout=600)
    exited = dt.datetime.now()
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "Error logging to API" not in log
    [stamp] = re.findall(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO +\| Flow run '[^']+' - Finished in state Completed\(\)", log,
                         re.M)
    finished = dt.datetime.combine(exited.date(), dt.time.fromisoformat(stamp))
    assert (exited - finished).total_seconds() % 86400 < 20, f"exited {exited:%H:%M:%S}, flow finished {stamp}"


def test_a_tracking_server_that_is_down_stops_the_flow_at_once(pipeline_env):
    from tests.integration.test_deployment import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    out = flow_cli(*CHEAP, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=90)
    assert time.monotonic() - t0 < 60
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: MLflow tracking server {uri} is not reachable ([Errno 111] Connection "
                                  "refused); start it (e.g. `docker compose -f docker/compose.yaml up -d mlflow`) "
                                  "or unset MLFLOW_TRACKING_URI to log to the local sqlite store")
    assert not (pipeline_env / "runs").exists()


SECRET = "sk-flow-secret-0123456789"


def test_a_secret_passed_with_set_never_reaches_mlflow(pipeline_env, prefect_api, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import searchrl_pipeline

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    overrides = [f"sample.teacher_served_model={SECRET}", "prepare.knowledge_world.probe.enabled=false"]
    result = searchrl_pipeline(overrides=overrides, stages=["prepare"])
    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_env / 'mlflow.db'}")
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.tags["overrides"] == "sample.teacher_served_model=*** prepare.knowledge_world.probe.enabled=false"
    runs = client.search_runs([parent.info.experiment_id])
    assert len(runs) == 2  # the pipeline and its prepare stage
    stored = json.dumps([[r.info.run_name, r.data.params, r.data.tags] for r in runs])
    assert SECRET not in stored and "***" in stored


def children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def start_flow_and_find_its_server(env: dict) -> tuple[subprocess.Popen, object]:
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline", *CHEAP], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        servers = [p for p in children(flow.pid) if "uvicorn" in " ".join(p.cmdline())]
        if servers:
            return flow, servers[0]
        if flow.poll() is not None:
            pytest.fail(f"the flow exited ({flow.returncode}) before its Prefect server was seen")
        time.sleep(0.2)
    pytest.fail("no Prefect server process under the flow after 180 s")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_flow_leaves_no_prefect_server(pipeline_env, sig):
    import psutil

    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    flow, server = start_flow_and_find_its_server(env)
    spawned = children(flow.pid)
    try:
        os.kill(flow.pid, sig)
        flow.wait(90)
        gone, alive = psutil.wait_procs([server], timeout=20)
        assert not alive, f"the Prefect server {server.pid} outlived the flow ({sig.name})"
        if sig == signal.SIGTERM:
            assert flow.returncode == 130  # a clean stop, as on Ctrl-C
    finally:
        for p in [server, *spawned, *children(flow.pid)]:
            if p.is_running():
                p.kill()
        if flow.poll() is None:
            flow.kill()
