"""A temporary Prefect API server whose life is tied to the flow process that started it.

Without PREFECT_API_URL, Prefect starts its own temporary server (uvicorn in a subprocess) and stops
it from an `atexit` hook, which never runs when the flow process is killed: the server (~200 MB) is
left running. `tied_server()` starts the same server (the command and environment Prefect's
`SubprocessASGIServer` uses: `uvicorn --factory prefect.server.api.server:create_app`, no UI, no
background services) as a `searchrl.services` service: its own process group, stopped when the `with`
block exits (normally, on an error or on Ctrl-C / SIGTERM; after Prefect's log and event workers have
delivered what they hold), and sent SIGTERM by the kernel when the flow process dies, SIGKILL included
(Linux's parent-death signal).

The flow then talks to it through PREFECT_API_URL (`prefect.settings.temporary_settings`). With
PREFECT_API_URL set (a real `prefect server start`), nothing is started.

`local_server()` finds a `prefect server start` on this machine for tools that need a real server
(flows/deploy.py): the URL that command serves by default (PREFECT_SERVER_API_HOST / _PORT, i.e.
http://127.0.0.1:4200/api), waiting while such a server process is still starting up.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from searchrl import services


def server_command(port: int) -> list[str]:
    """The temporary server's command line (as Prefect's SubprocessASGIServer runs it)."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


@contextlib.contextmanager
def tied_server(timeout_s: float | None = None) -> Iterator[str | None]:
    """Yield the API URL of a temporary server tied to this process (None, starting nothing, when
    PREFECT_API_URL is set). `searchrl.services.ServiceError` if it does not answer /health within
    `timeout_s` seconds (default: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield None
        return
    port = services.free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True),
           # what makes create_app() a temporary server: no UI, no background services
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    with services.running(server_command(port), f"{url}/health", env=env, replace_env=True, name="prefect server",
                          timeout_s=timeout_s or float(settings.server.ephemeral.startup_timeout_seconds),
                          grace_s=10.0, interval_s=0.2):
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                deliver_pending()


def deliver_pending(timeout_s: float = 30.0) -> None:
    """Let Prefect's background workers send the logs and events they still hold (the flow's last lines
    are batched every few seconds) while the server is up. Stopped first, the server leaves them
    retrying against a closed port for over a minute before the process can exit, then printing
    "Error logging to API"."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


def local_server_url() -> str:
    """The API URL `prefect server start` serves with this environment's settings:
    http://<PREFECT_SERVER_API_HOST>:<PREFECT_SERVER_API_PORT>/api (default http://127.0.0.1:4200/api);
    a wildcard bind address (0.0.0.0, ::) is reached through 127.0.0.1."""
    from prefect.settings import Settings

    api = Settings().server.api  # read now (environment, profile), as `prefect server start` reads them
    host = "127.0.0.1" if str(api.host) in ("0.0.0.0", "::", "") else str(api.host)
    return f"http://{host}:{api.port}/api"


def server_start_port(cmdline: list[str], environ: dict[str, str]) -> int | None:
    """The port of a `prefect server start` command line (its --port, else its environment's
    PREFECT_SERVER_API_PORT, else 4200); None for any other command."""
    names = [Path(a).name for a in cmdline]
    i = next((i for i, n in enumerate(names) if n == "prefect"), None)
    if i is None or names[i + 1:i + 3] != ["server", "start"]:
        return None
    for j, arg in enumerate(cmdline):
        if arg == "--port" and j + 1 < len(cmdline):
            return int(cmdline[j + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return int(environ.get("PREFECT_SERVER_API_PORT") or 4200)


def server_starting(port: int) -> bool:
    """True while a `prefect server start` process of this user for `port` runs on this machine."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if server_start_port(proc.info["cmdline"] or [], proc.environ()) == port:
                return True
        except (psutil.Error, ValueError):
            continue
    return False


def local_server(wait_s: float = 180.0) -> str | None:
    """The API URL of the local `prefect server start` (`local_server_url`) once its /health answers;
    while a server process for that port is still starting (migrating a fresh database takes a while),
    wait for it up to `wait_s` seconds. None when nothing answers and no such process runs."""
    from urllib.parse import urlsplit

    url = local_server_url()
    port = urlsplit(url).port
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        if services.probe(f"{url}/health", timeout_s=2.0):
            return url
        if time.monotonic() > deadline or not server_starting(port):
            return None
        if not told:
            print(f"waiting for the Prefect server starting at {url} ...", file=sys.stderr, flush=True)
            told = True
        time.sleep(1.0)
