"""Scheduled retraining for real: a local `prefect server start`, `python -m flows.deploy` serving the
pipeline with its cron schedule, one triggered run that completes (smoke preset, prepare only,
knowledge probe off: cheap but the real flow, DVC stage and MLflow run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, pipeline_env_vars

pytestmark = pytest.mark.slow

CRON = "0 3 * * 0"
DEPLOYMENT = "searchrl-pipeline/retrain"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-4000:] if log else ''}")
        try:
            if result := check():
                return result
        except Exception:  # not up yet
            pass
        time.sleep(1)
    pytest.fail(f"{what}: not ready after {timeout:.0f}s\n{log.read_text()[-4000:] if log else ''}")


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def local_env(tmp_path: Path, port: int) -> dict:
    """The environment of README's commands on a machine where the local server's port is `port`:
    PREFECT_SERVER_API_PORT (read by `prefect server start` and by flows.deploy), no PREFECT_API_URL."""
    env = {**os.environ, **pipeline_env_vars(tmp_path), "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` as README runs it (no --host / --port: the settings it shares with
    flows.deploy; a free port instead of 4200), its own PREFECT_HOME. Yields (api_url, env, log) at once,
    while the server is still starting, as `prefect server start &` leaves the next command."""
    port = free_port()
    env = local_env(tmp_path, port)
    log = tmp_path / "server.log"
    proc = start([str(BIN / "prefect"), "server", "start"], env, log)
    try:
        yield f"http://127.0.0.1:{port}/api", env, log
    finally:
        stop(proc)


def test_deploy_says_what_to_do_without_a_server(tmp_path):
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "flows.deploy", "--preset", "configs/smoke.yaml"], cwd=PROJECT_ROOT,
                         env=local_env(tmp_path, port), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: no Prefect server at http://127.0.0.1:{port}/api (PREFECT_API_URL is unset): start one with "
        "`prefect server start &`, or export PREFECT_API_URL=http://HOST:PORT/api for a server elsewhere; "
        "the temporary server of `python -m flows.pipeline` has no scheduler")

    url = f"http://127.0.0.1:{port}/api"
    out = subprocess.run([sys.executable, "-m", "flows.deploy"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         env={**local_env(tmp_path, port), "PREFECT_API_URL": url}, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: the Prefect server PREFECT_API_URL={url} does not answer {url}/health; "
                                  "start it, or unset PREFECT_API_URL to use a local `prefect server start`")


def test_deployment_schedule_and_triggered_run(prefect_server, tmp_path):
    """README's commands as written: `prefect server start &`, then at once `python -m flows.deploy`
    with PREFECT_API_URL unset: it waits for the starting local server and registers there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, env, server_log = prefect_server
    log = tmp_path / "serve.log"
    serve = start([sys.executable, "-m", "flows.deploy", "--cron", CRON, "--preset", "configs/smoke.yaml",
                   "--stages", "prepare", "--set", "prepare.knowledge_world.probe.enabled=false"], env, log)
    try:
        wait_until(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, 180,
                   "prefect server", log=server_log)
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                deployment = wait_until(lambda: client.read_deployment_by_name(DEPLOYMENT), 120,
                                        "deployment registration", serve, log)
                [schedule] = deployment.schedules
                assert schedule.schedule.cron == CRON
                assert schedule.active
                assert deployment.parameters == {
                    "preset": "configs/smoke.yaml", "stages": ["prepare"],
                    "overrides": ["prepare.knowledge_world.probe.enabled=false"]}

            run = run_deployment(DEPLOYMENT, timeout=600, poll_interval=2)
            assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-6000:]}"

            # The server's scheduler queued the next cron runs (Sundays 03:00 UTC).
            def scheduled():
                with get_client(sync_client=True) as client:
                    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[deployment.id])))
                return [r for r in runs if r.state and r.state.is_scheduled()]

            upcoming = wait_until(scheduled, 90, "scheduled runs (the server's scheduler service)",
                                  log=server_log)
            for r in upcoming:
                start_at = r.expected_start_time.astimezone(UTC)
                assert (start_at.isoweekday(), start_at.hour, start_at.minute) == (7, 3, 0), start_at
    finally:
        stop(serve)
    assert f"using the local Prefect server {api}" in log.read_text()

    ws = tmp_path / "runs" / "smoke"
    assert (ws / "data" / "prepared" / "corpus.parquet").is_file()
    assert (ws / "dvc.lock").is_file()
    assert not (ws / "data" / "index").exists()  # only the requested stage ran
