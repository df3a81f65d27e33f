"""The method's claims in miniature, with error bars (issue 11/11): fewer retrievals at equal accuracy,
and memorization that sticks, on the Knowledge World (ground truth for every hop).

    python bench/ablation.py                    # run configs/ablation.yaml through the flow, then analyse
    python bench/ablation.py --skip-run         # analyse an existing runs/ablation workspace again
    python bench/ablation.py --workspace DIR --out bench/results/ablation.json

1. Runs `python -m flows.pipeline --preset configs/ablation.yaml` (resumable: DVC skips finished stages,
   RL resumes from its checkpoints; rerun the same command after an interruption). Every RL arm starts
   from the same SFT cold start and sees the same questions in the same order:
       (a) rl                  R1-Searcher++ (format + answer + group reward + memorization)
       (b) rl_no_group_reward  (c) rl_no_memorization  (d) rl_vanilla (answer + format only)
       and R1-Searcher's two-stage recipe from the base policy (rl_r1searcher).
   Wall time and the peak resident memory of the whole process tree are recorded.
2. Per arm, on the 120-question entity-disjoint eval split: F1, CEM, retrievals (RC), format-valid,
   over-search (searched a fact the base model knows) and under-search (answered without retrieving an
   external hop), each a mean with a 95% percentile-bootstrap interval over questions
   (searchrl/intervals.py); the comparisons are paired bootstrap differences over the same questions.
3. Memorization: closed-book CEM on the seen-facts questions whose facts the arm rolled out in training
   (their `seen_from` question was in a training step), before (the SFT model) and after RL; the
   effect (a) - (c) is paired over the facts both arms visited.
4. Training signal from each arm's log.csv: the share of steps and of groups in which the group
   reward fired, the step-1 correct rate (the SFT model sampled at temperature 1 on training
   questions), and the SFT model's greedy accuracy on training questions.
5. Writes bench/results/ablation.json and two plots: per-arm curves (reward, RC, format-valid over
   steps; the band is a rolling 4-step mean +- one standard deviation of the step values) and a bar
   chart of the final metrics with their intervals. Claims are stated as numbers with a verdict:
   "holds" (the interval excludes 0 in the claimed direction), "not shown" (it contains 0), or
   "contradicted" (it excludes 0 the other way).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {
    "rl": "(a) R1-Searcher++",
    "rl_no_group_reward": "(b) w/o group reward",
    "rl_no_memorization": "(c) w/o memorization",
    "rl_vanilla": "(d) vanilla outcome RL",
    "rl_r1searcher": "R1-Searcher two-stage (base policy)",
}
BASELINES = {"direct": "base policy, closed book", "sft": "SFT cold start (the arms' start)"}


# ----------------------------------------------------------------------------- running
def run_pipeline(preset: str, extra: list[str]) -> dict:
    """The flow, with the wall time and the peak RSS of its whole process tree (sampled every second)."""
    import psutil

    cmd = [sys.executable, "-m", "flows.pipeline", "--preset", preset, *extra]
    print("ablation:", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peak = [0.0]

    def watch():
        while proc.poll() is None:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree if p.is_running()) / 2**30
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()
    rc = proc.wait()
    if rc != 0:
        sys.exit(f"ablation: the pipeline failed (exit {rc}); fix the cause and rerun (it resumes)")
    return {"command": " ".join(cmd[1:]), "wall_seconds": round(time.time() - t0, 1),
            "peak_rss_gb_process_tree": round(peak[0], 2), "load_average_end": os.getloadavg()}


# ----------------------------------------------------------------------------- reading the workspace
def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_log(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def fnum(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def per_question(ws: Path, method: str, eval_meta: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{question id: {f1, cem, rc, format_valid, over, under}} of one method on the eval split (x100 for
    rates), from reports/eval/predictions/<method>.jsonl and the eval records' hop chains."""
    path = ws / "reports" / "eval" / "predictions" / f"{method}.jsonl"
    out: dict[str, dict[str, float]] = {}
    for r in read_jsonl(path):
        if r["dataset"].endswith("_seen"):
            continue
        meta = eval_meta.get(r["id"], {})
        hops = meta.get("hops") or []
        seen = set(r.get("retrieved_ids") or [])
        row = {"f1": 100 * r["f1"], "cem": 100 * r["cem"], "rc": float(r["retrievals"]),
               "format_valid": 100.0 * bool(r.get("format_valid"))}
        if hops and r.get("retrieved_ids") is not None:
            row["over"] = 100.0 * any(h.get("source") == "internal" and h.get("passage_id") in seen for h in hops)
            row["under"] = 100.0 * (r.get("finish_reason") == "answered" and any(
                h.get("source") == "external" and h.get("passage_id") not in seen for h in hops))
        out[r["id"]] = row
    return out


def closed_book_seen(ws: Path, method: str) -> dict[str, float]:
    """{seen question id: closed-book CEM x100} of `method` on the seen-facts split."""
    path = ws / "reports" / "eval" / "predictions" / f"{method}_closed_book.jsonl"
    if not path.exists():
        return {}
    return {r["id"]: 100 * r["cem"] for r in read_jsonl(path) if r["dataset"].endswith("_seen")}


# ----------------------------------------------------------------------------- statistics
def summarize(values: dict[str, dict[str, float]], keys, resamples: int) -> dict:
    from searchrl.intervals import bootstrap_mean

    out = {"n": len(values)}
    for k in keys:
        xs = [v[k] for v in values.values() if k in v]
        if xs:
            mean, lo, hi = bootstrap_mean(xs, resamples, seed=0)
            out[k] = {"mean": round(mean, 3), "lo": round(lo, 3), "hi": round(hi, 3)}
    return out


def paired(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], key: str, resamples: int) -> dict:
    from searchrl.intervals import paired_difference

    d = paired_difference({q: v[key] for q, v in a.items() if key in v},
                          {q: v[key] for q, v in b.items() if key in v}, resamples, seed=0)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def verdict(d: dict, direction: str) -> str:
    """'holds' when the interval lies entirely on the claimed side of 0 (direction '<' or '>'),
    'contradicted' when entirely on the other, 'not shown' otherwise ('not tested' without one)."""
    if d.get("lo") is None:
        return "not tested"
    lo, hi = d["lo"], d["hi"]
    if direction == "<":
        return "holds" if hi < 0 else ("contradicted" if lo > 0 else "not shown")
    return "holds" if lo > 0 else ("contradicted" if hi < 0 else "not shown")


# ----------------------------------------------------------------------------- training signal
def training_signal(ws: Path, arm: str) -> dict:
    path = ws / "reports" / "rl" / arm / "log.csv"
    if not path.exists():
        return {}
    rows = read_log(path)
    grp = [fnum(r.get("group_reward")) for r in rows]
    groups = [fnum(r.get("group_reward_groups")) for r in rows]
    grp_v = [g for g in grp if g is not None]
    groups_v = [g for g in groups if g is not None]
    metrics = json.loads((ws / "reports" / "rl" / arm / "metrics.json").read_text())
    visited = sorted({q for r in rows for q in (r.get("questions") or "").split()})
    return {
        "steps": len(rows),
        "steps_per_hour": metrics.get("steps_per_hour"),
        "step1_correct": fnum(rows[0].get("correct")) if rows else None,
        "group_reward_steps": round(sum(g > 0 for g in grp_v) / len(grp_v), 3) if grp_v else None,
        "group_reward_groups": round(sum(groups_v) / len(groups_v), 3) if groups_v else None,
        "memorization_set_mean": _mean([fnum(r.get("memorization_size")) for r in rows]),
        "questions_trained": len(visited),
        "curves": {k: [fnum(r.get(k)) for r in rows] for k in ("reward", "retrievals", "format_valid", "correct")},
        "visited": visited,
    }


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def sft_train_accuracy(ws: Path, n: int) -> dict | None:
    """Greedy accuracy (R1-Searcher++'s answer reward: CEM, <= 10 words) and format-valid of the SFT
    model on the first n training questions, through the agent loop with the workspace's index."""
    if n <= 0:
        return None
    import pandas as pd  # noqa: F401  (read_qa needs pandas)

    from searchrl.agent.backends import make_backend
    from searchrl.agent.engine import run_rollouts
    from searchrl.agent.protocols import get_protocol
    from searchrl.config import load_params
    from searchrl.data.schema import read_qa
    from searchrl.retrieval.factory import open_retriever
    from searchrl.rewards import is_correct

    cwd = os.getcwd()
    os.chdir(ws)
    try:
        params = load_params("params.yaml")
        records = read_qa(Path(params.prepare.out_dir) / "train.parquet")[:n]
        backend = make_backend(params.policy.model_copy(update={"model": params.sft.out_dir}), params.agent)
        protocol = get_protocol(params.rl.protocol, params.agent)
        trajs = run_rollouts(backend, open_retriever(params), protocol, records, n=1, agent_cfg=params.agent)
    finally:
        os.chdir(cwd)
    answers = {r.id: r.answers for r in records}
    correct = [is_correct(t.answer, answers[t.question_id]) for t in trajs]
    valid = [t.finish_reason == "answered" and not protocol.validate(t) for t in trajs]
    return {"questions": len(trajs), "correct": round(100 * sum(correct) / len(trajs), 1),
            "format_valid": round(100 * sum(valid) / len(trajs), 1)}


# ----------------------------------------------------------------------------- plots
def plot(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), dpi=120)
    for ax, key, label in zip(axes, ("reward", "retrievals", "format_valid"),
                              ("reward", "retrievals per rollout (RC)", "format-valid rate"), strict=True):
        for arm, name in ARMS.items():
            ys = result["training"].get(arm, {}).get("curves", {}).get(key)
            if not ys:
                continue
            y = np.array([np.nan if v is None else v for v in ys], dtype=float)
            x = np.arange(1, len(y) + 1)
            w = 4
            mean = np.array([np.nanmean(y[max(0, i - w + 1): i + 1]) for i in range(len(y))])
            std = np.array([np.nanstd(y[max(0, i - w + 1): i + 1]) for i in range(len(y))])
            line, = ax.plot(x, mean, label=name, linewidth=1.6)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
        ax.set_xlabel("RL step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "ablation_curves.png"
    fig.savefig(path)
    plt.close(fig)
    files.append(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))

    metrics = [("f1", "F1"), ("cem", "CEM"), ("rc", "retrievals (RC)"), ("seen_cem_after", "seen facts, closed-book CEM")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(15, 3.8), dpi=120)
    names = [m for m in [*BASELINES, *ARMS] if m in result["methods"]]
    for ax, (key, label) in zip(axes, metrics, strict=True):
        vals, los, his = [], [], []
        for m in names:
            s = result["methods"][m].get(key) or {}
            vals.append(s.get("mean", np.nan))
            los.append(s.get("mean", np.nan) - s.get("lo", np.nan) if s else np.nan)
            his.append(s.get("hi", np.nan) - s.get("mean", np.nan) if s else np.nan)
        ax.bar(range(len(names)), vals, yerr=[los, his], capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(label + " (95% CI)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out_dir / "ablation_bars.png"
    fig.savefig(path)
    plt.close(fig)
    files.append(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
    return files


# ----------------------------------------------------------------------------- main
def analyse(ws: Path, resamples: int, sft_train_n: int) -> dict:
    from searchrl.data.schema import read_qa

    eval_meta = {r.id: r.metadata for r in read_qa(ws / "data" / "prepared" / "eval.parquet")}
    seen_meta = {r.id: r.metadata for r in read_qa(ws / "data" / "prepared" / "seen.parquet")}
    keys = ("f1", "cem", "rc", "format_valid", "over", "under")
    values = {m: per_question(ws, m, eval_meta) for m in [*BASELINES, *ARMS]
              if (ws / "reports" / "eval" / "predictions" / f"{m}.jsonl").exists()}
    result: dict = {"methods": {}, "training": {}, "comparisons": {}, "memorization": {}, "claims": {}}
    for m, v in values.items():
        result["methods"][m] = {"label": {**BASELINES, **ARMS}[m], **summarize(v, keys, resamples)}
    for arm in ARMS:
        sig = training_signal(ws, arm)
        if sig:
            result["training"][arm] = {k: v for k, v in sig.items() if k != "visited"}
            result["training"][arm]["visited_questions"] = sig["visited"]

    # memorization: seen facts whose source question the arm rolled out
    before = closed_book_seen(ws, "sft")
    for arm in ARMS:
        after = closed_book_seen(ws, arm)
        visited = set(result["training"].get(arm, {}).get("visited_questions", []))
        facts = [q for q in after if visited & set(seen_meta.get(q, {}).get("seen_from", []))]
        if not facts:
            continue
        from searchrl.intervals import bootstrap_mean, paired_difference

        a_mean, a_lo, a_hi = bootstrap_mean([after[q] for q in facts], resamples, seed=0)
        b_mean, b_lo, b_hi = bootstrap_mean([before[q] for q in facts if q in before], resamples, seed=0)
        gain = paired_difference({q: after[q] for q in facts}, {q: before[q] for q in facts if q in before},
                                 resamples, seed=0)
        result["memorization"][arm] = {"facts": len(facts), "cem_before": [b_mean, b_lo, b_hi],
                                       "cem_after": [a_mean, a_lo, a_hi], "gain": gain}
        result["methods"].setdefault(arm, {})["seen_cem_after"] = {"mean": a_mean, "lo": a_lo, "hi": a_hi}
    if before:
        visited_any = set().union(*[set(t.get("visited_questions", [])) for t in result["training"].values()])
        facts = [q for q in before if visited_any & set(seen_meta.get(q, {}).get("seen_from", []))]
        if facts:
            from searchrl.intervals import bootstrap_mean

            m, lo, hi = bootstrap_mean([before[q] for q in facts], resamples, seed=0)
            result["methods"].setdefault("sft", {})["seen_cem_after"] = {"mean": m, "lo": lo, "hi": hi}

    # the claims, as paired differences
    def cmp(a: str, b: str, key: str) -> dict | None:
        if a in values and b in values:
            return paired(values[a], values[b], key, resamples)
        return None

    for a, b in (("rl", "rl_vanilla"), ("rl", "rl_no_group_reward"), ("rl", "rl_no_memorization"),
                 ("rl", "sft"), ("rl_vanilla", "sft")):
        for key in ("rc", "f1", "cem", "over", "under"):
            d = cmp(a, b, key)
            if d:
                result["comparisons"][f"{a} - {b}: {key}"] = d
    rc = result["comparisons"].get("rl - rl_vanilla: rc")
    f1 = result["comparisons"].get("rl - rl_vanilla: f1")
    if rc:
        base = result["methods"]["rl_vanilla"]["rc"]["mean"]
        result["claims"]["fewer retrievals than vanilla outcome RL (a) vs (d)"] = {
            "rc_difference": rc, "relative_change_percent": round(100 * rc["diff"] / base, 1) if base else None,
            "verdict": verdict(rc, "<")}
    if f1:
        result["claims"]["F1 at least equal to vanilla outcome RL (a) vs (d)"] = {
            "f1_difference": f1, "verdict": "holds" if f1["lo"] is not None and f1["lo"] > 0 else
            ("not worse within the interval" if f1["lo"] is not None and f1["hi"] >= 0 else "contradicted")}
    ma, mc = result["memorization"].get("rl"), result["memorization"].get("rl_no_memorization")
    if ma and mc:
        after_a, after_c = closed_book_seen(ws, "rl"), closed_book_seen(ws, "rl_no_memorization")
        visited = set(result["training"]["rl"]["visited_questions"]) & \
            set(result["training"]["rl_no_memorization"]["visited_questions"])
        facts = [q for q in after_a if q in after_c and visited & set(seen_meta.get(q, {}).get("seen_from", []))]
        from searchrl.intervals import paired_difference

        d = paired_difference({q: after_a[q] for q in facts}, {q: after_c[q] for q in facts}, resamples, seed=0)
        result["claims"]["memorization sticks: seen facts closed-book CEM (a) vs (c)"] = {
            "cem_difference": d, "verdict": verdict(d, ">")}
    gr = result["training"].get("rl", {})
    result["claims"]["group reward fires"] = {"share_of_steps": gr.get("group_reward_steps"),
                                             "share_of_groups": gr.get("group_reward_groups")}
    result["sft_on_training_questions"] = {
        "greedy": sft_train_accuracy(ws, sft_train_n),
        "step1_sampled_correct_rate": gr.get("step1_correct")}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python bench/ablation.py", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="configs/ablation.yaml")
    ap.add_argument("--workspace", default=None, help="the preset's workspace (default runs/<preset name>)")
    ap.add_argument("--skip-run", action="store_true", help="analyse the workspace as it is")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE for the flow")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--sft-train-questions", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablation.json"))
    args = ap.parse_args(argv)
    ws = Path(args.workspace) if args.workspace else \
        Path(os.environ.get("SEARCHRL_RUNS_DIR", ROOT / "runs")) / Path(args.preset).stem
    run = None
    if not args.skip_run:
        run = run_pipeline(args.preset, [x for o in args.overrides for x in ("--set", o)])
    result = analyse(ws.resolve(), args.resamples, args.sft_train_questions)
    result["run"] = run
    result["workspace"] = str(ws)
    out = Path(args.out)
    result["plots"] = plot(result, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["claims"], indent=2))
    print(f"ablation: wrote {out}")


if __name__ == "__main__":
    main()
