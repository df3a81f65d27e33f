"""One preset through every stage of the Prefect flow, as a user runs it, measured.

    python bench/preset_run.py configs/hotpotqa_local.yaml      # ~2 hours on a 2-core CPU
    python bench/preset_run.py                                  # the embedded default (== make run)

Runs `python -m flows.pipeline [--preset PRESET] [--set ...]` in this checkout (a preset's workspace
under runs/, the embedded default's the project itself; the shared DVC cache) and records: wall
seconds, the peak resident memory of the whole process tree (flow, Prefect server, DVC, the stage;
sampled every second) and, per stage, the peak of the tree while it ran and of the stage's own
processes, each stage's seconds (from its "Running stage" line to its task's completion in the flow
log), what the sample and SFT stages kept, each RL run's summary, and the evaluation's metrics. A
stage DVC finds up to date takes ~1 s, so measure a preset on a workspace and DVC cache it has not run
in. Not a timed test: the CPU may be shared (the load average at the end is recorded).
Results: bench/results/<preset name>_run.json, make_run.json for the default (or --out); the flow's log
in runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from searchrl.io import read_json

ROOT = Path(__file__).resolve().parents[1]
STAGE_START = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) .*Task run 'dvc-repro-(\S+)' - Running stage")
STAGE_END = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) .*Task run 'dvc-repro-(\S+)' - Finished in state")


def clock_seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def stage_seconds(log_text: str) -> dict[str, float]:
    """{stage: seconds} from the flow log's Prefect task lines (a run past midnight wraps once)."""
    start, out = {}, {}
    for line in log_text.splitlines():
        if m := STAGE_START.match(line):
            start[m.group(2)] = clock_seconds(m.group(1))
        elif (m := STAGE_END.match(line)) and m.group(2) in start:
            secs = clock_seconds(m.group(1)) - start.pop(m.group(2))
            out[m.group(2)] = round(secs + 86400 if secs < 0 else secs, 1)
    return out


def run_flow(args: list[str], log: Path) -> dict:
    """The flow in a child process: wall seconds, the peak RSS (GiB) of its process tree, and per stage
    the peak of the tree while the stage ran and of the stage's own processes."""
    from smoke_footprint import tree_sample  # bench/ is the script's directory

    peak, done = [0], threading.Event()
    tree_peak: dict[str, int] = {}
    own_peak: dict[str, int] = {}
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", *args], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.is_set():
                total, stages = tree_sample(proc.pid)
                peak[0] = max(peak[0], total)
                for stage, rss in stages.items():
                    tree_peak[stage] = max(tree_peak.get(stage, 0), total)
                    own_peak[stage] = max(own_peak.get(stage, 0), rss)
                done.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    gib = lambda b: round(b / 2**30, 2)  # noqa: E731
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gib_process_tree": gib(peak[0]),
            "peak_rss_gib_by_stage": {k: {"process_tree": gib(tree_peak[k]), "stage": gib(own_peak[k])}
                                      for k in tree_peak}}


def optional_json(path: Path):
    return read_json(path) if path.exists() else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="",
                    help="a preset under configs/, e.g. configs/hotpotqa_local.yaml (none: the embedded default)")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", help="key=value overrides, passed to the flow's --set")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/<preset>_run.json (make_run.json without a preset)")
    ap.add_argument("--note", default="", help="recorded as is (e.g. what else ran on the machine)")
    ap.add_argument("--earlier-log", type=Path, default=None,
                    help="the flow log of an interrupted run of the same workspace: the seconds of the stages "
                         "it finished (which this run finds up to date) are taken from it")
    args = ap.parse_args(argv)

    name = Path(args.preset).stem if args.preset else "make"
    out = args.out or ROOT / "bench" / "results" / f"{name}_run.json"
    workspace = Path(os.environ.get("SEARCHRL_RUNS_DIR", ROOT / "runs")) / name if args.preset else ROOT
    log = ROOT / "runs" / f"{name}_flow.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    flow_args = (["--preset", args.preset] if args.preset else []) + (["--set", *args.overrides] if args.overrides else [])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"preset_run: python -m flows.pipeline {' '.join(flow_args)}  (log: {log})", flush=True)
    result = run_flow(flow_args, log)
    text = log.read_text(errors="replace")
    if result["rc"] != 0:
        sys.exit(f"preset_run: the flow exited {result['rc']}; log: {log}\n{text[-3000:]}")
    ran = re.findall(r"DVC ran: (.*)$", text, re.M)
    current = stage_seconds(text)
    earlier = stage_seconds(args.earlier_log.read_text(errors="replace")) if args.earlier_log else {}
    earlier = {k: v for k, v in earlier.items() if k not in current}
    record = {
        "bench": f"every stage of {args.preset or 'the embedded default (make run)'} through the Prefect flow",
        "command": f"python bench/preset_run.py {args.preset}".rstrip()
                   + (f" --set {' '.join(args.overrides)}" if args.overrides else ""),
        "commit": commit, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "note": args.note, **result, "dvc_ran": ran[-1] if ran else None,
        "stage_seconds": {**earlier, **current},
        "stage_seconds_from_earlier_log": sorted(earlier),
        "index": optional_json(workspace / "reports" / "index" / "metrics.json"),
        "sample": optional_json(workspace / "data" / "sft" / "stats.json"),
        "sft": optional_json(workspace / "reports" / "sft" / "metrics.json"),
        "rl": {d.name: optional_json(d / "metrics.json") for d in sorted((workspace / "reports" / "rl").glob("*"))},
        "eval": optional_json(workspace / "reports" / "eval" / "metrics.json"),
        "memorization": optional_json(workspace / "reports" / "eval" / "memorization.json"),
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"preset_run: {result['seconds']:.0f} s, peak {result['peak_rss_gib_process_tree']} GiB -> {out}")


if __name__ == "__main__":
    main()
