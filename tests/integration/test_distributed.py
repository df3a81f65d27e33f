"""Multi-process training on CPU: `accelerate launch --num_processes 2` with configs/accelerate/ddp.yaml
(two processes, gloo). The sft and rl stages each: finish under 2 processes, resume after the whole
run is killed (SIGKILL to every process), and follow the loss curve of one process with the same
global batch, step by step (relative tolerance 1e-4; the final weights agree to 1e-4 as well).

RL rollouts come from a deterministic stand-in policy (tests/integration/ddp_child.py: even samples
of each group search and answer right, odd ones answer wrong), so both runs see the same rollouts and
the comparison isolates the distributed arithmetic: whole groups per rank, rewards gathered in group
order, advantages whitened over every rank, the memorization loss normalised over every rank, DDP's
gradient averaging.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).parent / "ddp_child.py"
pytestmark = pytest.mark.slow


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             PYTHONPATH=str(ROOT), **extra)
    return e


def command(stage: str, work: Path, model: Path, steps: int, processes: int) -> list[str]:
    args = [str(CHILD), stage, str(work), str(model), str(steps)]
    if processes == 1:
        return [sys.executable, *args]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
            "--num_processes", str(processes), "--main_process_port", str(29500 + os.getpid() % 1000), *args]


def run(stage, work, model, steps, processes, **extra):
    done = subprocess.run(command(stage, work, model, steps, processes), env=env(**extra), cwd=work,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return json.loads((work / "result.json").read_text()), done.stdout + done.stderr


def run_killed_then_resumed(stage, work, model, steps, marker: str):
    proc = subprocess.Popen(command(stage, work, model, steps, 2), env=env(SLOW="1.0"), cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list(work.glob(marker)):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0].decode()[-5000:]
    time.sleep(0.3)
    # SIGKILL to every process: torchrun starts each rank in a session of its own, so the launcher's
    # process group does not reach them
    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in tree[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)
    assert not (work / "result.json").exists()
    return run(stage, work, model, steps, 2)


def weights(path: Path) -> dict:
    return safetensors.torch.load_file(path / "model.safetensors")


def assert_same_run(one: dict, two: dict):
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [s for s, _ in two["losses"]] == [s for s, _ in one["losses"]]
    for (_, a), (_, b) in zip(one["losses"], two["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    w1, w2 = weights(Path(one["model"])), weights(Path(two["model"]))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sft_two_processes_match_one_and_resume_after_a_kill(tmp_path, tiny_model_dir):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, _ = run("sft", tmp_path / "one", tiny_model_dir, 4, 1)
    two, log = run_killed_then_resumed("sft", tmp_path / "two", tiny_model_dir, 4, "ckpt/checkpoint-2/trainer_state.json")
    assert "resuming from" in log
    assert_same_run(one, two)


def test_rl_two_processes_match_one_and_resume_after_a_kill(tmp_path, tiny_model_dir):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, _ = run("rl", tmp_path / "one", tiny_model_dir, 4, 1)
    two, log = run_killed_then_resumed("rl", tmp_path / "two", tiny_model_dir, 4,
                                       "ckpt/rl-*/rl/checkpoint-2/trainer_state.json")
    assert "resuming from" in log
    assert_same_run(one, two)
