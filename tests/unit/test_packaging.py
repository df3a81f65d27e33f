"""The `gpu` extra must resolve: pip's resolver on `.[gpu]` as a fresh Linux x86-64 GPU machine would
run it (no local wheels, no machine constraints), without downloading models or installing anything.

It needs the package index (PyPI), which CI machines reach; SEARCHRL_OFFLINE=1 skips it on a machine
that cannot. The resolved set is checked for the versions the project's pins promise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_extra_resolves_with_vllm_and_trl(tmp_path):
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("vLLM's wheels are for Linux x86-64, where the GPU machines are")
    if os.environ.get("SEARCHRL_OFFLINE") == "1":
        pytest.skip("SEARCHRL_OFFLINE=1: no package index to resolve against")
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_DEFAULT_TIMEOUT="60")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), f"{ROOT}[gpu]"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, "pip could not resolve .[gpu]:\n" + (done.stdout + done.stderr)[-4000:]
    installed = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    assert installed["vllm"] == "0.31.0"
    assert installed["trl"] == "1.16.0"
    assert installed["torch"] == "2.13.0"  # PyPI's CUDA build: no local CPU wheel, no "+cpu"
    assert installed["transformers"] == "5.17.0"  # the pin the CPU suite runs on too
    assert any(name.startswith("nvidia-") for name in installed)


def test_gpu_image_installs_the_gpu_extra():
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    installs = re.findall(r"pip install ([^\n&]+)", text)
    assert any('-e ".[gpu]"' in line for line in installs), installs
    assert "--index-url" not in text  # torch comes from the same resolution, not another index
