"""A temporary Prefect API server whose life is tied to the flow process that started it.

Without PREFECT_API_URL, Prefect starts its own temporary server (uvicorn in a subprocess) and stops
it from an `atexit` hook, which never runs when the flow process is killed: the server (~200 MB) is
left running. `tied_server()` starts the same server (the command and environment Prefect's
`SubprocessASGIServer` uses: `uvicorn --factory prefect.server.api.server:create_app`, no UI, no
background services) as a `searchrl.services` service: its own process group, stopped when the `with`
block exits (normally, on an error or on Ctrl-C / SIGTERM), and sent SIGTERM by the kernel when the
flow process dies, SIGKILL included (Linux's parent-death signal).

The flow then talks to it through PREFECT_API_URL (`prefect.settings.temporary_settings`). With
PREFECT_API_URL set (a real `prefect server start`), nothing is started.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

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
            yield url
