"""searchrl.services: start a subprocess service, wait for its health endpoint, stop its whole process
group — on success, on error, on a service that ignores SIGTERM, and when the starter is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from searchrl import services
from searchrl.services import ServiceError

# A health server: GET /health answers 200. Modes: "child" also forks a worker into its process group
# (written to child.pid), "ignore-term" ignores SIGTERM.
SERVER = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys
    port, mode, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "child":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.path.join(workdir, "child.pid"), "w").write(str(child.pid))
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    print(f"listening on {port} ({mode})", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.fixture
def server(tmp_path):
    script = tmp_path / "health_server.py"
    script.write_text(SERVER)

    def cmd(mode: str = "ok"):
        port = services.free_port()
        return [sys.executable, str(script), str(port), mode, str(tmp_path)], f"http://127.0.0.1:{port}/health"

    return cmd


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_running_waits_for_health_and_stops_the_whole_process_group(server, tmp_path):
    cmd, url = server("child")
    log = tmp_path / "logs" / "svc.log"
    with services.running(cmd, url, log_path=log, timeout_s=60, interval_s=0.1, grace_s=5) as svc:
        assert services.probe(url)
        child = int((tmp_path / "child.pid").read_text())
        assert os.getpgid(child) == svc.pid  # the worker is in the service's group
        assert not gone(child)
    assert gone(svc.pid) and gone(child)
    assert not services.probe(url)
    text = log.read_text()
    assert "$ " + " ".join(cmd[:2]) in text and "listening on" in text  # command line and output, appended


def test_an_error_inside_the_block_still_stops_the_service(server):
    cmd, url = server()
    with pytest.raises(KeyboardInterrupt):
        with services.running(cmd, url, timeout_s=60, interval_s=0.1) as svc:
            raise KeyboardInterrupt
    assert gone(svc.pid)


def test_a_service_that_exits_at_start_is_reported_at_once_with_its_log(tmp_path):
    log = tmp_path / "bad.log"
    cmd = [sys.executable, "-c", "import sys; print('error: unrecognized flag --tensor-paralel'); sys.exit(3)"]
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as err:
        with services.running(cmd, "http://127.0.0.1:9/health", log_path=log, timeout_s=60, interval_s=0.1,
                              name="vLLM server (rl)"):
            pass
    msg = str(err.value)
    assert time.monotonic() - t0 < 30  # not the 60 s deadline
    assert msg.startswith("vLLM server (rl): exited with code 3 before http://127.0.0.1:9/health answered")
    assert "unrecognized flag --tensor-paralel" in msg and str(log) in msg


def test_no_health_answer_in_time_names_the_url(tmp_path):
    svc = services.start([sys.executable, "-c", "import time; time.sleep(600)"], log_path=tmp_path / "s.log")
    try:
        with pytest.raises(ServiceError, match=r"no healthy answer from http://127\.0\.0\.1:9/health within 1s"):
            services.wait_healthy("http://127.0.0.1:9/health", 1, svc, interval_s=0.2)
    finally:
        services.stop(svc, grace_s=5)
    assert gone(svc.pid)


def test_a_service_ignoring_sigterm_is_killed_after_the_grace(server):
    cmd, url = server("ignore-term")
    svc = services.start(cmd)
    services.wait_healthy(url, 60, svc, interval_s=0.1)
    t0 = time.monotonic()
    code = services.stop(svc, grace_s=1.0)
    assert code == -signal.SIGKILL and gone(svc.pid)
    assert 1.0 <= time.monotonic() - t0 < 20


def test_stopping_twice_is_harmless(server):
    cmd, url = server()
    svc = services.start(cmd)
    services.wait_healthy(url, 60, svc, interval_s=0.1)
    first = services.stop(svc, grace_s=5)
    assert services.stop(svc, grace_s=5) == first


def test_a_missing_executable_is_one_line():
    with pytest.raises(ServiceError, match=r"^vllm: cannot start `/nonexistent/vllm serve m`"):
        services.start(["/nonexistent/vllm", "serve", "m"], name="vllm")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_a_service_dies_with_the_process_that_started_it(server, tmp_path):
    """SIGKILL the starter: the kernel's parent-death signal stops the service (no server left on a GPU)."""
    cmd, url = server()
    starter = textwrap.dedent(f"""
        import sys, time
        from searchrl import services
        svc = services.start({cmd!r}, log_path={str(tmp_path / "svc.log")!r})
        services.wait_healthy({url!r}, 60, svc, interval_s=0.1)
        print(svc.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert services.probe(url)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pid)


def test_secret_flags_are_masked_in_the_logged_command():
    line = services.redacted(["vllm", "serve", "m", "--api-key", "sk-123", "--hf-token=hf_abc", "--port", "8000"])
    assert line == "vllm serve m --api-key '***' '--hf-token=***' --port 8000"
    assert "sk-123" not in line and "hf_abc" not in line
