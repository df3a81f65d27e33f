"""docker/compose.yaml without docker: the servers publish on loopback only, the MLflow server started
with compose's own arguments accepts the Host header the pipeline container sends
(`Host: mlflow:5000`), and the volumes resolve to the folders beside the repository."""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, shared_data_dir

COMPOSE = PROJECT_ROOT / "docker" / "compose.yaml"
BIN = Path(sys.executable).parent


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` interpolation (the forms compose.yaml uses)."""
    def value(m: re.Match) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", value, text)


def host_path(source: str, env: dict[str, str] | None = None) -> Path:
    """A volume's host side as compose resolves it: relative to the compose file's folder."""
    return (COMPOSE.parent / interpolate(source, env or {})).resolve()


def test_servers_publish_on_loopback_only():
    services = compose()["services"]
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"mlflow", "prefect", "retrieval"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_volumes_resolve_beside_the_repository():
    pipeline = compose()["services"]["pipeline"]
    mounts = {}
    for volume in pipeline["volumes"]:  # SOURCE:TARGET[:MODE], SOURCE possibly ${VAR:-default}
        m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::\w+)?", volume)
        mounts[m.group(2)] = m.group(1)
    # the data folder beside the repository (/work/shared next to /work/main), where presets look
    shared = host_path(mounts["/shared"])
    assert shared == (PROJECT_ROOT.parent / "shared").resolve()
    assert shared / "data" == shared_data_dir()
    assert host_path(mounts["/shared"], {"SEARCHRL_SHARED": "/srv/data-root"}) == Path("/srv/data-root")
    # in the container, presets' ../shared/data (relative to the project root /app) lands in the mount
    assert posixpath.normpath(posixpath.join(pipeline["working_dir"], "../shared")) == "/shared"
    # the pipeline's outputs are the repository's own folders
    for target in ("/app/data", "/app/models", "/app/reports", "/app/runs", "/app/.dvc/cache"):
        assert host_path(mounts[target]) == PROJECT_ROOT / target.removeprefix("/app/")


def mlflow_argv(tmp_path: Path, port: int) -> list[str]:
    """compose's `mlflow server ...` command, with a local store, port and loopback binding."""
    argv = shlex.split(compose()["services"]["mlflow"]["command"])
    assert argv[:2] == ["mlflow", "server"]
    local = {"--host": "127.0.0.1", "--port": str(port), "--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--artifacts-destination": str(tmp_path / "artifacts")}
    for i, arg in enumerate(argv):
        if arg in local:
            argv[i + 1] = local[arg]
    return [str(BIN / "mlflow"), *argv[1:]]


def get(url: str, host: str) -> int:
    """The HTTP status of GET `url` sent with this Host header (-1: nothing listening yet)."""
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return -1


@pytest.mark.slow
def test_compose_mlflow_server_accepts_the_pipeline_containers_host(tmp_path):
    from tests.integration.test_deployment import free_port, stop

    port = free_port()
    log = tmp_path / "mlflow.log"
    proc = subprocess.Popen(mlflow_argv(tmp_path, port), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        deadline = time.monotonic() + 180
        while get(f"http://127.0.0.1:{port}/health", f"127.0.0.1:{port}") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start\n{log.read_text()[-3000:]}")
            time.sleep(1)
        assert get(api, "mlflow:5000") == 200  # what MLFLOW_TRACKING_URI=http://mlflow:5000 sends
        # compose's healthcheck (which the pipeline waits for) asks http://localhost:5000/health
        services = compose()["services"]
        assert "http://localhost:5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
        assert services["pipeline"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
        assert get(f"http://127.0.0.1:{port}/health", "localhost:5000") == 200
        assert get(api, "localhost:5000") == 200  # the UI through the published port
        assert get(api, "attacker.example:5000") == 403  # DNS-rebinding protection stays on
    finally:
        stop(proc)


def test_retrieval_service_serves_the_default_index_on_loopback():
    svc = compose()["services"]["retrieval"]
    argv = shlex.split(interpolate(svc["command"], {}))
    assert argv[:3] == ["python", "-m", "searchrl.retrieval.serve"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    # inside the container it listens on every interface, published on the host's loopback only
    assert flags["--host"] == "0.0.0.0" and svc["ports"] == [f"127.0.0.1:{flags['--port']}:{flags['--port']}"]
    assert flags["--index"] == "data/index"  # the default params' index.out_dir, in the mounted data folder
    assert "../data:/app/data" in svc["volumes"] and svc["working_dir"] == "/app"
    assert svc["depends_on"] == {} and "8765/health" in " ".join(svc["healthcheck"]["test"])
    from searchrl.retrieval.serve import main

    with pytest.raises(SystemExit) as exc:  # the command's flags are the server's own
        main([*argv[3:], "--help"])
    assert exc.value.code == 0
