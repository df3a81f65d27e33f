"""bench/gpu_check.py runs end to end on a CPU with --tiny (the GPU run is the same code with bigger
shapes): every generation path, the engine's tokens against generate's, the JSON it writes, and one
step of the RL stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_tiny.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["setup"]["dtype"] == "float32" and res["setup"]["rollouts"] == 8 and res["setup"]["new_tokens"] == 8
    assert res["setup"]["bandwidth_bytes_per_s"] is None  # no GPU: no ceiling is claimed
    (shape,) = res["shapes"]
    assert shape["shape"] == "tiny" and shape["weight_bytes_per_step"] > 0
    paths = shape["paths"]
    assert set(paths) == {"engine", "engine_static", "engine_dynamic", "generate_dynamic", "generate_static"}
    for name, p in paths.items():
        assert "error" not in p, (name, p)
        assert p["tokens"] == 8 * 8 and p["tokens_per_s"] > 0 and p["peak_memory_gb"] > 0
        # float32 on CPU, greedy: every row of every path is generate's row
        assert p["rows_equal_to_generate_dynamic"] == 8, name
    assert paths["engine"]["graph_captures"] == 0 and paths["engine"]["decode_steps"] == 8
    assert shape["engine_vs_best_generate"] > 0
    assert res["rl"]["steps"] == 1 and res["rl"]["logged_steps"] == [1], res["rl"]
