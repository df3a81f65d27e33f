"""Shared pytest fixtures. Keep each fixture small; add new ones below the existing ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import searchrl  # noqa: F401  (sets OMP_WAIT_POLICY before any test module imports torch)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- ../shared/data
def shared_data_dir() -> Path:
    """`../shared/data` next to the project root; `SEARCHRL_SHARED_DATA` overrides."""
    env = os.environ.get("SEARCHRL_SHARED_DATA")
    return Path(env).resolve() if env else (PROJECT_ROOT.parent / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    """The real data folder; tests using it are marked `shared_data`. Absent: skip, unless
    SEARCHRL_REQUIRE_SHARED_DATA=1 (CI machines that must have it), then fail."""
    path = shared_data_dir()
    if not path.is_dir():
        reason = f"shared data folder not found at {path} (set SEARCHRL_SHARED_DATA to its location)"
        if os.environ.get("SEARCHRL_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{reason}; SEARCHRL_REQUIRE_SHARED_DATA=1 requires it")
        pytest.skip(reason)
    return path


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (from the embedded GGUF package; skips where it is not installed)."""
    from searchrl.errors import ModelNotFoundError
    from searchrl.models import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m-instruct")
    except ModelNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A randomly initialised 2-layer llama with the real SmolLM2 tokenizer, saved as a model dir
    (a path, so TRL can reload it as its reference model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- pipeline / flows
def pipeline_env_vars(tmp: Path) -> dict[str, str]:
    """Environment that keeps a pipeline run out of the repository and the user's home: preset
    workspaces under `tmp/runs` sharing the DVC cache `tmp/dvc-cache` (not the project's: no run-cache
    entry of another test or of the developer's own runs restores a stage a test expects to run),
    MLflow in `tmp/mlflow.db`, Prefect state in `tmp/prefect`, offline."""
    return {
        "SEARCHRL_RUNS_DIR": str(tmp / "runs"),
        "SEARCHRL_DVC_CACHE": str(tmp / "dvc-cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture
def pipeline_env(tmp_path, monkeypatch) -> Path:
    """`pipeline_env_vars(tmp_path)` set in this process (flows run in-process inherit it, and so do
    the DVC stages they start); returns tmp_path."""
    for key, value in pipeline_env_vars(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("SEARCHRL_PARENT_RUN_ID", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API (its own SQLite database, a subprocess server) for flows run in-process."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
