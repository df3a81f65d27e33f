"""The smoke preset as a user runs it: wall time, memory and disk, and what one changed knob reruns.

    python bench/smoke_footprint.py          # ~10 minutes on a 2-core CPU

Three runs of `python -m flows.pipeline`, each a fresh process with its own temporary Prefect server,
in a temp dir (workspaces, the shared DVC cache, MLflow and Prefect state; nothing in the repository):
1. `--preset configs/smoke.yaml`: every stage runs (`make smoke`);
2. the same again: DVC finds every stage up to date;
3. a copy of the preset with `rl.lr` changed, i.e. a fresh workspace (runs/smoke_lr/) after a completed
   run: the stages upstream of rl come out of the shared run-cache (searchrl/runcache.py), the RL stages
   and evaluate run.
Recorded per run: wall seconds, the peak resident memory of the whole process tree (flow, Prefect
server, DVC, the stage; sampled every 0.5 s), and the flow's own "DVC ran" / "restored" lines; then the
disk used by each workspace and by the shared DVC cache, and the sizes of .venv and the dequantised
model cache. Not a timed test: the CPU may be shared (the load average is recorded).
Results: bench/results/smoke.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def disk_bytes(path: Path) -> int:
    """Bytes of the files under path (each inode once, links not followed), as `du` counts them."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def stage_of(cmdline: list[str]) -> str | None:
    """The DVC stage a process runs, from its command line: `python -m tasks.rl --ablation x` (also
    under `python -m searchrl.launch tasks.rl ...`) -> "rl_ablation@x"; None for any other process."""
    for j, arg in enumerate(cmdline):
        if arg.startswith("tasks."):
            rest = cmdline[j + 1:]
            if "--ablation" in rest and rest.index("--ablation") + 1 < len(rest):
                return f"rl_ablation@{rest[rest.index('--ablation') + 1]}"
            return arg.removeprefix("tasks.")
    return None


def tree_sample(pid: int) -> tuple[int, dict[str, int]]:
    """(RSS bytes of the process tree under pid, {stage: RSS bytes of that stage's processes})."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, {}
    total, stages = 0, {}
    for p in procs:
        try:
            rss, stage = p.memory_info().rss, stage_of(p.cmdline())
        except psutil.Error:
            continue
        total += rss
        if stage is not None:
            stages[stage] = stages.get(stage, 0) + rss
    return total, stages


def tree_rss(pid: int) -> int:
    """RSS bytes of the process tree under pid."""
    return tree_sample(pid)[0]


def run_flow(args: list[str], env: dict, log: Path) -> dict:
    """One `python -m flows.pipeline` run: seconds, peak tree RSS, stages ran / restored."""
    cmd = [sys.executable, "-m", "flows.pipeline", *args]
    peak, done = [0], threading.Event()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                done.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} exited {rc}; log: {log}\n{text[-3000:]}")
    ran = re.findall(r"DVC ran: (.*)$", text, re.M)
    restored = re.findall(r"restored from the run-cache \([^)]*\): (.*)$", text, re.M)
    return {"args": " ".join(shlex.quote(a) for a in args), "seconds": round(seconds, 1),
            "peak_rss_gb": round(peak[0] / 1e9, 2), "dvc_ran": ran[-1] if ran else None,
            "restored": restored[-1] if restored else "", "load_avg_1m_before": round(load, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", default="3.0e-05", help="rl.lr of the third run (params.yaml's is 1e-5)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "smoke.json")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (its path is printed)")
    ap.add_argument("--note", default="", help="recorded as is, e.g. which code the runs used")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="smoke-footprint-"))
    env = {**os.environ, "SEARCHRL_RUNS_DIR": str(tmp / "runs"), "SEARCHRL_DVC_CACHE": str(tmp / "dvc-cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PREFECT_HOME": str(tmp / "prefect"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
           "GX_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("PREFECT_API_URL", "SEARCHRL_PARENT_RUN_ID", "SEARCHRL_ROOT"):
        env.pop(key, None)
    smoke = ROOT / "configs" / "smoke.yaml"
    variant = tmp / "smoke_lr.yaml"
    variant.write_text(smoke.read_text(encoding="utf-8").replace("rl:                   # one step per RL run",
                                                                 f"rl:\n  lr: {args.lr}\n  # one step per RL run", 1))
    assert f"lr: {args.lr}" in variant.read_text()

    runs = {}
    for name, flow_args in [("first", ["--preset", "configs/smoke.yaml"]),
                            ("second", ["--preset", "configs/smoke.yaml"]),
                            ("new_workspace_rl_lr", ["--preset", str(variant)])]:
        runs[name] = run_flow(flow_args, env, tmp / f"{name}.log")
        print(f"{name}: {runs[name]}", flush=True)

    cache_dir = Path(os.environ.get("SEARCHRL_CACHE") or Path.home() / ".cache" / "searchrl")
    result = {
        "bench": "smoke_footprint",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT),
                                                               *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "note": args.note,
        "machine": {"cpus": os.cpu_count(), "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)},
        "runs": runs,
        "disk_gb": {"runs/smoke": round(disk_bytes(tmp / "runs" / "smoke") / 1e9, 2),
                    "runs/smoke_lr": round(disk_bytes(tmp / "runs" / "smoke_lr") / 1e9, 2),
                    "shared DVC cache": round(disk_bytes(tmp / "dvc-cache") / 1e9, 2),
                    ".venv": round(disk_bytes(ROOT / ".venv") / 1e9, 2) if (ROOT / ".venv").is_dir() else None,
                    "model cache (SEARCHRL_CACHE)": round(disk_bytes(cache_dir) / 1e9, 2) if cache_dir.is_dir() else None},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
