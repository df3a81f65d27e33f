"""Peak resident memory of the RL stage, and what holds it: micro-batch size and activations.

    python bench/bench_memory.py                 # after `make run` (its data and models/sft); ~15 min
    python bench/bench_memory.py --workspace runs/ablation --steps 2

Each configuration runs `python -m tasks.rl` for `--steps` steps in a fresh temporary workspace (the
source workspace's data/ and models/sft, its params.yaml with rl overridden; nothing in the source is
written) and samples the process's RSS every 0.2 s. Configurations: rl.micro_batch_size 4 and 1 (the
same update: the step accumulates over all its rollouts) and, at 1, rl.gradient_checkpointing
(activations recomputed in the backward pass) or rl.use_lora (adapters on a frozen base that is also
the KL reference: no second model; gradients and AdamW moments for the adapters only). Also recorded:
the floor of any fp32 full-parameter RL step with a frozen reference, 4 bytes x parameters x (policy +
reference + gradients + 2 AdamW moments). Not a timed test: seconds per step are recorded with the
load average.
Results: bench/results/memory.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from searchrl.io import read_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: rl overrides
    "micro_batch_4": {"micro_batch_size": 4},
    "micro_batch_1": {"micro_batch_size": 1},
    "micro_batch_1_gradient_checkpointing": {"micro_batch_size": 1, "gradient_checkpointing": True},
    "micro_batch_1_lora": {"micro_batch_size": 1, "use_lora": True},  # frozen base = the reference
    "micro_batch_1_lora_gradient_checkpointing": {"micro_batch_size": 1, "use_lora": True,
                                                  "gradient_checkpointing": True},
}


def workspace_copy(source: Path, dest: Path, rl: dict) -> None:
    """dest: source's data/ and models/sft (copied), code links, params.yaml with `rl` merged in."""
    dest.mkdir(parents=True)
    shutil.copytree(source / "data", dest / "data", symlinks=True)
    shutil.copytree(source / "models" / "sft", dest / "models" / "sft")
    for name in ("searchrl", "tasks"):
        (dest / name).symlink_to(ROOT / name)
    params = yaml.safe_load((source / "params.yaml").read_text())
    params["rl"].update(rl)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_rl(workspace: Path, env: dict, log: Path) -> dict:
    from smoke_footprint import tree_rss  # bench/ is the script's directory

    peak, done = [0], threading.Event()
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.rl"], cwd=workspace, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                done.wait(0.2)

        threading.Thread(target=sample, daemon=True).start()
        rc = proc.wait()
        done.set()
    if rc != 0:
        sys.exit(f"tasks.rl exited {rc}; log: {log}\n{log.read_text(errors='replace')[-2000:]}")
    metrics = json.loads(next(workspace.glob("bench-rep/*/metrics.json")).read_text())
    return {"peak_rss_gib": round(peak[0] / 2**30, 2), "seconds": round(time.perf_counter() - t0, 1),
            "steps": metrics["steps"], "steps_per_hour": metrics["steps_per_hour"],
            "load_average_end": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, default=ROOT, help="a workspace after its sft stage (default: the project)")
    ap.add_argument("--steps", type=int, default=2, help="RL steps per configuration (default: 2)")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                    help="configurations to run (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json",
                    help="result file (default: bench/results/memory.json)")
    args = ap.parse_args(argv)
    source = args.workspace.resolve()
    if not (source / "models" / "sft" / "config.json").is_file():
        sys.exit(f"bench_memory: {source / 'models' / 'sft'} has no model; run `make run` (or --workspace) first")
    base = yaml.safe_load((source / "params.yaml").read_text())["rl"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SEARCHRL_PARENT_RUN_ID", None)
    results = {}
    try:
        for name in args.configs:
            overrides = CONFIGS[name]
            ws = tmp / name
            workspace_copy(source, ws, {"max_steps": args.steps, "save_steps": args.steps, **overrides,
                                        "checkpoint_dir": "bench-ckpt", "out_dir": "bench-out",
                                        "metrics_dir": "bench-rep"})
            print(f"bench_memory: {name} ({args.steps} steps of {base['prompts_per_step']} x "
                  f"{base['num_generations']} rollouts) ...", flush=True)
            results[name] = {**overrides, **run_rl(ws, env, tmp / f"{name}.log")}
            print(f"bench_memory: {name}: {results[name]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    from safetensors import safe_open

    with safe_open(str(source / "models" / "sft" / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    record = {
        "bench": "peak RSS of the RL stage process (tasks.rl) by rl.micro_batch_size, gradient checkpointing and LoRA",
        "command": "python bench/bench_memory.py" + (f" --workspace {args.workspace}" if source != ROOT else "")
                   + f" --steps {args.steps}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
        "rl": {k: base[k] for k in ("num_generations", "prompts_per_step", "memorization", "beta")},
        "parameters": n_params,
        "floor_gib_fp32_policy_reference_grads_adamw": round(4 * n_params * 5 / 2**30, 2),
        "results": results,
    }
    if args.out.is_file():  # earlier findings stay on record ("tried_*", "before_*", written by hand)
        record.update({k: v for k, v in read_json(args.out).items() if k.startswith(("tried_", "before_"))})
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"bench_memory: -> {args.out}")


if __name__ == "__main__":
    main()
