"""Which Trainer checkpoint to resume from: the one code path of the sft and rl stages.

A Trainer checkpoint `checkpoint-N/` is written in this order (transformers 5 `_save_checkpoint`):
model weights, optimizer / scheduler / RNG state, then `trainer_state.json`. A stage killed while
saving therefore leaves a newest directory without (or with a half-written) trainer state, and
`transformers.trainer_utils.get_last_checkpoint` would pick it and fail ("Can't find a valid
checkpoint"). Here a checkpoint is complete when its trainer state parses, names step N, and its
model weights are present; resuming takes the newest complete one and removes the incomplete ones
newer than it (they cannot be resumed and would shadow it).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
           "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint-N directory under run_dir, oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _CKPT_RE.match(d.name))]
    return sorted(found)


def is_complete(ckpt: str | Path) -> bool:
    """trainer_state.json parses and names this checkpoint's step, and the model weights are there."""
    ckpt = Path(ckpt)
    m = _CKPT_RE.match(ckpt.name)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if m is None or not isinstance(state, dict) or state.get("global_step") != int(m.group(1)):
        return False
    return any((ckpt / w).is_file() for w in WEIGHTS)


def last_complete_checkpoint(run_dir: str | Path, remove_incomplete: bool = True) -> str | None:
    """Newest complete checkpoint under run_dir (None if there is none); incomplete ones newer than it
    are removed (with a warning) unless remove_incomplete is False."""
    for _, d in reversed(checkpoints(run_dir)):
        if is_complete(d):
            return str(d)
        if remove_incomplete:
            log.warning("removing the incomplete checkpoint %s (the stage was stopped while saving it)", d)
            shutil.rmtree(d, ignore_errors=True)
    return None
