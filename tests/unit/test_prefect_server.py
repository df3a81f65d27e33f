"""flows/server.py: which local `prefect server start` flows.deploy talks to when PREFECT_API_URL is unset."""

from __future__ import annotations

import pytest

from flows.server import local_server, local_server_url, server_start_port


@pytest.mark.parametrize("cmdline, environ, port", [
    (["/x/.venv/bin/python", "/x/.venv/bin/prefect", "server", "start"], {}, 4200),
    (["prefect", "server", "start", "--port", "4300"], {}, 4300),
    (["prefect", "server", "start", "--host", "0.0.0.0", "--port=4301"], {}, 4301),
    (["prefect", "server", "start"], {"PREFECT_SERVER_API_PORT": "4302"}, 4302),
    (["prefect", "server", "start", "--port", "4303"], {"PREFECT_SERVER_API_PORT": "4302"}, 4303),
    (["prefect", "worker", "start"], {}, None),
    (["prefect", "server", "stop"], {}, None),
    (["python", "-m", "flows.deploy"], {}, None),
    ([], {}, None),
])
def test_server_start_port(cmdline, environ, port):
    assert server_start_port(cmdline, environ) == port


@pytest.mark.parametrize("env, url", [
    ({}, "http://127.0.0.1:4200/api"),
    ({"PREFECT_SERVER_API_PORT": "4311"}, "http://127.0.0.1:4311/api"),
    ({"PREFECT_SERVER_API_HOST": "0.0.0.0"}, "http://127.0.0.1:4200/api"),
    ({"PREFECT_SERVER_API_HOST": "10.1.2.3", "PREFECT_SERVER_API_PORT": "80"}, "http://10.1.2.3:80/api"),
])
def test_local_server_url_follows_the_settings_prefect_server_start_reads(monkeypatch, env, url):
    for key in ("PREFECT_SERVER_API_HOST", "PREFECT_SERVER_API_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert local_server_url() == url


def test_no_server_and_none_starting_returns_at_once(monkeypatch):
    from tests.integration.test_deployment import free_port

    monkeypatch.setenv("PREFECT_SERVER_API_PORT", str(free_port()))
    assert local_server(wait_s=60) is None
