"""RL (and SFT) step time and loss agreement: one process vs two DDP processes (gloo, CPU).

    python bench/bench_distributed.py                     # rl, 2 and 6 steps, a 4-layer 256-wide llama
    python bench/bench_distributed.py --stage sft --hidden 128

Runs tests/integration/ddp_child.py, the harness of the distributed test (the real `train_rl` /
`train_sft` under `accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2`, with
a deterministic stand-in policy for the rollouts so both runs see the same data), on a random-init llama
with the SmolLM2 tokenizer, same global batch on both sides:
- one process with 2 torch threads (the whole 2-core machine), one process with 1 thread, and two
  processes with 1 thread each;
- each for `--short` and `--long` optimizer steps; the step time is the difference of the two wall times
  divided by the difference in steps (so start-up, model loading and the final save cancel out);
- loss agreement: the largest relative difference of the per-step losses, two processes vs one.
Results: bench/results/distributed.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "integration" / "ddp_child.py"


def make_model(out: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from searchrl.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(stage: str, work: Path, model: Path, steps: int, processes: int, threads: int) -> tuple[float, list]:
    work.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    args = [str(CHILD), stage, str(work), str(model), str(steps)]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(29500 + os.getpid() % 1000), *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bench_distributed: {stage} with {processes} process(es) failed:\n"
                         f"{(done.stdout + done.stderr)[-3000:]}")
    return wall, json.loads((work / "result.json").read_text())["losses"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--stage", choices=["rl", "sft"], default="rl")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--long", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed.json"))
    a = ap.parse_args()

    sides = {"1 process, 2 threads": (1, 2), "1 process, 1 thread": (1, 1), "2 processes, 1 thread each": (2, 1)}
    result: dict = {"bench": "distributed", "command": "python " + " ".join(["bench/bench_distributed.py", *sys.argv[1:]]),
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "setup": {"stage": a.stage, "model": f"random-init llama, {a.layers} layers, hidden {a.hidden}, "
                              "SmolLM2 tokenizer", "steps": [a.short, a.long], "harness": str(CHILD.relative_to(ROOT)),
                              "global batch": "the same on every side (ddp_child.py)"},
                    "loadavg_start": list(os.getloadavg()), "sides": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", a.hidden, a.layers)
        losses = {}
        for name, (processes, threads) in sides.items():
            walls = {}
            for steps in (a.short, a.long):
                walls[steps], losses[name] = run(a.stage, Path(tmp) / f"{processes}-{threads}-{steps}", model, steps,
                                                 processes, threads)
            per_step = (walls[a.long] - walls[a.short]) / (a.long - a.short)
            result["sides"][name] = {"wall_s": {str(k): round(v, 2) for k, v in walls.items()},
                                     "seconds_per_step": round(per_step, 3)}
            print(f"{name}: {per_step:.2f} s/step (walls {walls})", flush=True)
    ref = losses["1 process, 1 thread"]
    two = losses["2 processes, 1 thread each"]
    rel = max(abs(b - a) / max(abs(a), 1e-12) for (_, a), (_, b) in zip(ref, two, strict=True))
    result["loss_agreement"] = {"steps": len(ref), "max_relative_difference": rel,
                                "losses_1_process": [x for _, x in ref], "losses_2_processes": [x for _, x in two]}
    result["loadavg_end"] = list(os.getloadavg())
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("sides", "loss_agreement")}, indent=1))


if __name__ == "__main__":
    main()
