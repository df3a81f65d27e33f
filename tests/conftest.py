"""Shared pytest fixtures. Keep each fixture small; add new ones below the existing ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
