"""`make` set-up on any machine: the Python versions it accepts (one line on another), and which torch
build scripts/install_torch.py installs where (the CPU build on Linux machines without an NVIDIA GPU,
without a second download where pip's configuration already has it). `make -n` prints the recipe
without running it; the pip probe runs against a temp wheelhouse, offline."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("install_torch", ROOT / "scripts" / "install_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install_torch = load_script()


# ----------------------------------------------------------------------------- the Makefile
def makefile_var(name: str) -> str:
    return re.search(rf"^{name} := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()


def test_makefile_pins_agree_with_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"torch=={makefile_var('TORCH_VERSION')}" in project["dependencies"]
    supported = makefile_var("PYTHON_VERSIONS").split()
    assert project["requires-python"] == f">={supported[0]},<3.{int(supported[-1].split('.')[1]) + 1}"
    assert [int(v.split(".")[1]) for v in supported] == list(range(11, 11 + len(supported)))


def fake_python(folder: Path, version: str) -> Path:
    """An executable that answers the Makefile's version question with `version`."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "python"
    exe.write_text(f"#!/bin/sh\necho {version}\n")
    exe.chmod(0o755)
    return exe


def make_n(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # under `make test` the parent make's MAKELEVEL/MAKEFLAGS would make this one print
    # "make[1]: Entering directory" lines between the recipe lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("version", ["3.10", "3.13", ""])
def test_make_refuses_another_python_in_one_line(tmp_path, version):
    exe = fake_python(tmp_path / "bin", version) if version else Path("/nonexistent/python3")
    out = make_n("setup", f"PYTHON={exe}", f"VENV={tmp_path / 'venv'}")
    assert out.returncode != 0
    [line] = [x for x in out.stderr.splitlines() if x.strip()]
    shown = version or "not a working Python"
    assert (f"*** searchrl supports Python 3.11 or 3.12 (pyproject.toml requires-python) but {exe} is {shown}; "
            "run e.g. `make PYTHON=python3.12`") in line
    assert not (tmp_path / "venv").exists()


def test_an_existing_venv_of_another_python_is_named(tmp_path):
    venv = tmp_path / "venv"
    fake_python(venv / "bin", "3.13")
    out = make_n("setup", f"PYTHON={fake_python(tmp_path / 'bin', '3.12')}", f"VENV={venv}")
    assert out.returncode != 0
    assert f"but {venv}/bin/python is 3.13; run e.g. `make PYTHON=python3.12` after deleting {venv}" in out.stderr


@pytest.mark.parametrize("version", ["3.11", "3.12"])
def test_make_setup_installs_torch_through_the_script_first(tmp_path, version):
    exe, venv = fake_python(tmp_path / "bin", version), tmp_path / "venv"
    out = make_n("setup", f"PYTHON={exe}", f"VENV={venv}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{exe} -m venv {venv}"
    assert lines[1].split() == [f"{venv}/bin/python", "scripts/install_torch.py", makefile_var("TORCH_VERSION")]
    assert lines[2] == f"{venv}/bin/python -m pip install -e ."
    out = make_n("setup", f"PYTHON={exe}", f"VENV={venv}", "TORCH_INDEX_URL=https://example.org/whl/cu126")
    assert "scripts/install_torch.py 2.13.0 --index-url https://example.org/whl/cu126" in out.stdout


# ----------------------------------------------------------------------------- the decision
def never():
    raise AssertionError("this probe must not be asked")


CPU = ["install", "torch==2.13.0", "--index-url", install_torch.CPU_INDEX, "--extra-index-url", install_torch.PYPI]
PLAIN = ["install", "torch==2.13.0"]


@pytest.mark.parametrize("facts, expected", [
    # already there (any build of this release): nothing, nothing probed
    ({"installed": "2.13.0+cpu", "system": "Linux", "gpu": never, "resolves": never, "cpu_index_up": never}, None),
    ({"installed": "2.13.0", "system": "Linux", "gpu": never, "resolves": never, "cpu_index_up": never}, None),
    # another release installed: decided as if absent
    ({"installed": "2.12.1+cpu", "system": "Linux", "gpu": lambda: False, "resolves": lambda: None,
      "cpu_index_up": lambda: True}, CPU),
    # macOS / Windows: PyPI's wheel is the CPU build
    ({"installed": None, "system": "Darwin", "gpu": never, "resolves": never, "cpu_index_up": never}, PLAIN),
    ({"installed": None, "system": "Windows", "gpu": never, "resolves": never, "cpu_index_up": never}, PLAIN),
    # Linux with an NVIDIA GPU: PyPI's CUDA build
    ({"installed": None, "system": "Linux", "gpu": lambda: True, "resolves": never, "cpu_index_up": never}, PLAIN),
    # Linux CPU, pip already resolves to a local CPU build (this CI machine's wheelhouse): plain, no download
    ({"installed": None, "system": "Linux", "gpu": lambda: False, "resolves": lambda: "2.13.0+cpu",
      "cpu_index_up": never}, PLAIN),
    # Linux CPU, pip would take PyPI's (CUDA) build, the CPU index answers: the CPU index
    ({"installed": None, "system": "Linux", "gpu": lambda: False, "resolves": lambda: "2.13.0",
      "cpu_index_up": lambda: True}, CPU),
    ({"installed": None, "system": "Linux", "gpu": lambda: False, "resolves": lambda: None,
      "cpu_index_up": lambda: True}, CPU),
    # Linux CPU, the CPU index unreachable: the plain install (with a warning)
    ({"installed": None, "system": "Linux", "gpu": lambda: False, "resolves": lambda: "2.13.0",
      "cpu_index_up": lambda: False}, PLAIN),
])
def test_choose(facts, expected):
    why, args = install_torch.choose("2.13.0", **facts)
    assert args == expected, why
    if facts["system"] == "Linux" and args == PLAIN and facts["gpu"] is not never and not facts["gpu"]():
        local = facts["resolves"]()
        assert why.startswith("warning") == (local is None or not local.endswith("+cpu"))


def test_an_index_url_overrides_the_decision():
    why, args = install_torch.choose("2.13.0", installed=None, system="Linux", gpu=never, resolves=never,
                                     cpu_index_up=never, index_url="https://download.pytorch.org/whl/cu126")
    assert args == ["install", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu126",
                    "--extra-index-url", install_torch.PYPI]


# ----------------------------------------------------------------------------- the probes, for real
def fake_wheel(folder: Path, version: str) -> Path:
    """A minimal valid wheel named torch (metadata only): enough for pip's resolver."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.parametrize("wheels, expected", [
    (["2.13.0+cpu"], "2.13.0+cpu"),
    (["2.13.0", "2.13.0+cpu"], "2.13.0+cpu"),  # both offered: pip takes the +cpu build (a higher version)
    (["2.13.0"], "2.13.0"),
    ([], None),                                 # nothing resolves (offline, no wheelhouse)
])
def test_pip_resolves_asks_pip_with_its_own_configuration(tmp_path, monkeypatch, wheels, expected):
    house = tmp_path / "wheels"
    house.mkdir()
    for version in wheels:
        fake_wheel(house, version)
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no machine or user pip.conf: only what is set here
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    assert install_torch.pip_resolves("2.13.0") == expected


def test_an_unreachable_index_is_answered_quickly():
    import time

    t0 = time.monotonic()
    assert install_torch.reachable("http://127.0.0.1:9/whl/cpu/torch/", timeout_s=2.0) is False
    assert time.monotonic() - t0 < 5


def test_the_script_here_keeps_the_installed_build(tmp_path):
    """On this machine's .venv torch 2.13.0 is installed: the script says so and installs nothing."""
    from importlib import metadata

    version = metadata.version("torch")
    if install_torch.base_version(version) != makefile_var("TORCH_VERSION"):
        pytest.skip(f"torch {version} installed here, not the pinned release")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "install_torch.py"), makefile_var("TORCH_VERSION"),
                          "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert out.stdout.strip() == f"install_torch: torch {version} is already installed"
