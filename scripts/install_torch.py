"""Install the torch build that fits this machine; `make setup` runs it first, before the package.

    python scripts/install_torch.py 2.13.0             # what `make setup` runs (with the venv's python)
    python scripts/install_torch.py 2.13.0 --dry-run   # print the decision and the pip command only
    python scripts/install_torch.py 2.13.0 --index-url https://download.pytorch.org/whl/cu126

Why: on Linux, PyPI's torch wheel is the CUDA build (with its nvidia-* wheels, several GB). A Linux
machine without an NVIDIA GPU only needs the CPU build, which PyTorch publishes on its own index
(https://download.pytorch.org/whl/cpu, versions tagged `+cpu`). Installing it before the package means
no later resolver pulls the CUDA build: the package pins `torch==V`, which `V+cpu` satisfies.

The decision, first match wins (`choose`):
1. torch V is already installed                                   -> nothing to do (idempotent)
2. --index-url given                                              -> that index (+ PyPI for torch's dependencies)
3. not Linux (PyPI's macOS / Windows wheels are CPU builds), or an NVIDIA GPU (`nvidia-smi -L` lists one)
                                                                  -> `pip install torch==V`
4. pip as configured here already resolves torch==V to a CPU build (`+cpu`: a local wheelhouse in
   find-links, a mirror, a CPU index in pip.conf; asked with `pip install --dry-run --report`)
                                                                  -> `pip install torch==V` (no second download)
5. the CPU index answers within a few seconds                     -> `pip install torch==V --index-url <CPU index>
                                                                      --extra-index-url https://pypi.org/simple`
6. otherwise (offline, a firewall)                                -> `pip install torch==V`, with a warning that on
                                                                      Linux this is the CUDA build
Only the standard library: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib import metadata

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"


def installed_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def base_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0' (the local tag names the build, not the release)."""
    return version.split("+", 1)[0]


def has_nvidia_gpu() -> bool:
    """`nvidia-smi -L` exists and lists at least one GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def pip_resolves(version: str) -> str | None:
    """The torch version `pip install torch==<version>` would install with pip's own configuration
    (indexes, find-links, constraints), e.g. '2.13.0+cpu' from a local wheelhouse; None when pip cannot
    resolve it (offline, no such release). Resolution only: nothing is installed, torch's metadata is
    read from the index (PEP 658) or the local wheel."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
           "--report", "-", f"torch=={version}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        install = json.loads(out.stdout)["install"] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError):
        return None
    return install[0]["metadata"]["version"] if install else None


def reachable(url: str, timeout_s: float = 5.0) -> bool:
    """True when `url` answers (any HTTP status) within `timeout_s` seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError, ValueError):
        return False


def choose(version: str, *, installed: str | None, system: str, gpu: Callable[[], bool],
           resolves: Callable[[], str | None], cpu_index_up: Callable[[], bool],
           index_url: str | None = None) -> tuple[str, list[str] | None]:
    """(why, pip arguments) for installing torch `version`; None arguments: nothing to install. The
    probes are callables, asked only when the decision gets to them (each may take seconds)."""
    plain = ["install", f"torch=={version}"]
    if installed is not None and base_version(installed) == version:
        return f"torch {installed} is already installed", None
    if index_url:
        return f"--index-url {index_url}", [*plain, "--index-url", index_url, "--extra-index-url", PYPI]
    if system != "Linux":
        return f"{system}: PyPI's torch wheel is the CPU build", plain
    if gpu():
        return "an NVIDIA GPU is present: PyPI's (CUDA) build", plain
    local = resolves()
    if local is not None and local.endswith("+cpu"):
        return f"no NVIDIA GPU; pip's configuration already provides the CPU build {local}", plain
    if cpu_index_up():
        return f"no NVIDIA GPU: the CPU build from {CPU_INDEX}", [*plain, "--index-url", CPU_INDEX,
                                                                  "--extra-index-url", PYPI]
    return (f"warning: no NVIDIA GPU, but {CPU_INDEX} does not answer: falling back to PyPI, whose Linux "
            "wheel is the CUDA build (several GB; it runs on the CPU too)", plain)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/install_torch.py", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("version", help="the torch release to install, e.g. 2.13.0 (the package's pin)")
    ap.add_argument("--index-url", default=os.environ.get("TORCH_INDEX_URL") or None,
                    help="install torch from this index instead of deciding (env TORCH_INDEX_URL)")
    ap.add_argument("--dry-run", action="store_true", help="print the decision and the command only")
    args = ap.parse_args(argv)
    why, pip_args = choose(args.version, installed=installed_version(), system=platform.system(), gpu=has_nvidia_gpu,
                           resolves=lambda: pip_resolves(args.version), cpu_index_up=lambda: reachable(f"{CPU_INDEX}/torch/"),
                           index_url=args.index_url)
    print(f"install_torch: {why}", file=sys.stderr if why.startswith("warning") else sys.stdout, flush=True)
    if pip_args is None:
        return 0
    cmd = [sys.executable, "-m", "pip", *pip_args]
    print("install_torch: $ " + " ".join(["python", "-m", "pip", *pip_args]), flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
