"""Subprocess services with a health endpoint (a vLLM server, a retrieval server, Prefect's API):
start one, wait until it answers, stop it, whatever happens in between.

    with services.running(["vllm", "serve", model, "--port", "8000"], "http://127.0.0.1:8000/health",
                          env={"CUDA_VISIBLE_DEVICES": "7"}, log_path="logs/vllm.log", timeout_s=900) as svc:
        ...  # the service answers; it is stopped when the block exits, normally or not

or the three steps on their own: `svc = start(cmd, env, log_path)`, `wait_healthy(url, timeout_s,
svc)`, `stop(svc)`.

- `start` runs the command in its own session (process group), so `stop` reaches the worker
  processes a server forks (vLLM's engine core and tensor-parallel workers) with it; stdout and stderr
  are appended to `log_path` (None: inherited). On Linux the kernel sends the service SIGTERM when
  the thread that started it dies, SIGKILL included (`prctl(PR_SET_PDEATHSIG)`): a crashed flow never
  leaves a server holding a GPU. (Start and stop a service from one long-lived thread: the signal
  follows the starting thread, not the process.)
- `wait_healthy` polls `GET url` until it answers 200. It raises `ServiceError` naming the URL when
  the deadline passes, and at once when the process exits, with its exit code and the log's last lines.
- `stop` sends SIGTERM to the process group, SIGKILL after `grace_s` seconds; stopping a stopped
  service does nothing.

`env` entries are added to this process's environment and never logged (they may hold keys); the
command line is written to the log with the values of secret-looking flags (`--api-key x`) masked.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from searchrl.errors import SearchRLError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_SECRET_FLAG = re.compile(r"(key|token|secret|password)", re.IGNORECASE)


class ServiceError(SearchRLError):
    """A service did not come up (exited, or no healthy answer in time); names the URL or command."""


@dataclass
class Service:
    """A started service: its process (the leader of its own process group) and where it logs."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None
    cmd: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redacted(cmd: Sequence[str]) -> str:
    """The command as one shell line, with the value of every secret-looking flag masked
    (`--api-key X`, `--hf-token=X`)."""
    out: list[str] = []
    mask_next = False
    for arg in map(str, cmd):
        if mask_next:
            out.append("***")
            mask_next = False
            continue
        if arg.startswith("-") and _SECRET_FLAG.search(arg):
            if "=" in arg:
                arg = arg.split("=", 1)[0] + "=***"
            else:
                mask_next = True
        out.append(arg)
    return shlex.join(out)


def parent_death_signal():
    """A preexec_fn asking the kernel to SIGTERM the child when the starting thread dies (Linux; None
    elsewhere). The libc lookup happens here, before the fork: after it only async-safe calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between the fork and the prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def start(cmd: Sequence[str], env: Mapping[str, str] | None = None, log_path: str | os.PathLike | None = None,
          cwd: str | os.PathLike | None = None, name: str | None = None, replace_env: bool = False) -> Service:
    """Start `cmd` in its own process group (see the module docstring). `env` is added to this
    process's environment (`replace_env`: used as the whole environment). ServiceError when the
    executable cannot be started."""
    cmd = [str(c) for c in cmd]
    name = name or Path(cmd[0]).name
    full_env = dict(env or {}) if replace_env else {**os.environ, **(env or {})}
    log_file = None
    path = Path(log_path) if log_path is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(path, "ab")  # noqa: SIM115 (the child holds it; closed below once inherited)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log_file.write(f"\n==> {stamp} {name}: $ {redacted(cmd)}\n".encode())
        log_file.flush()
    try:
        proc = subprocess.Popen(cmd, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                                start_new_session=True, preexec_fn=parent_death_signal())
    except OSError as err:
        raise ServiceError(f"{name}: cannot start `{redacted(cmd)}`: {err.strerror or err}") from None
    finally:
        if log_file is not None:
            log_file.close()
    return Service(name, proc, path, cmd)


def log_tail(path: str | os.PathLike | None, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' when there is none)."""
    if path is None or not Path(path).exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def probe(url: str, timeout_s: float = 5.0) -> bool:
    """True when GET url answers 200 within `timeout_s`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, timeout_s: float, service: Service | None = None, interval_s: float = 1.0) -> float:
    """Poll GET `url` until it answers 200; returns the seconds waited. ServiceError when `timeout_s`
    passes or `service` exits first (see the module docstring)."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        if service is not None and not service.running():
            raise ServiceError(_exited(service, url))
        if probe(url, timeout_s=min(5.0, max(0.5, interval_s * 2))):
            return time.monotonic() - t0
        if time.monotonic() >= deadline:
            where = f" (log: {service.log_path})" if service is not None and service.log_path else ""
            tail = log_tail(service.log_path, 10) if service is not None else ""
            raise ServiceError(f"{service.name + ': ' if service else ''}no healthy answer from {url} within "
                               f"{timeout_s:.0f}s{where}" + (f"; last log lines:\n{tail}" if tail else ""))
        time.sleep(interval_s)


def _exited(service: Service, url: str) -> str:
    tail = log_tail(service.log_path, 20)
    where = f" (log: {service.log_path})" if service.log_path else ""
    return (f"{service.name}: exited with code {service.proc.returncode} before {url} answered{where}"
            + (f"; last log lines:\n{tail}" if tail else ""))


def stop(service: Service, grace_s: float = 30.0) -> int | None:
    """SIGTERM the service's process group, SIGKILL it after `grace_s` seconds; returns the leader's
    exit code. The whole group is waited for, not just the leader: a server's workers may outlive it."""
    proc = service.proc
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            proc.poll()  # reap the leader: a zombie still counts as a member of its group
            if not _group_alive(proc.pid):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5.0)  # the leader is dead (perhaps not reaped yet): its exit code
                return proc.returncode
            time.sleep(0.1)
    return proc.poll()


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: an orphaned worker that has
    exited waits for init to reap it, and some container inits never do."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


@contextlib.contextmanager
def running(cmd: Sequence[str], health_url: str, *, env: Mapping[str, str] | None = None,
            log_path: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
            timeout_s: float = 600.0, name: str | None = None, grace_s: float = 30.0,
            interval_s: float = 1.0, replace_env: bool = False) -> Iterator[Service]:
    """Start `cmd` (arguments as `start`), wait until `health_url` answers, yield the Service, stop it
    on the way out (normal exit, exception, KeyboardInterrupt)."""
    service = start(cmd, env=env, log_path=log_path, cwd=cwd, name=name, replace_env=replace_env)
    try:
        wait_healthy(health_url, timeout_s, service, interval_s=interval_s)
        yield service
    finally:
        stop(service, grace_s=grace_s)
