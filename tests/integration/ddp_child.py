"""Child process of tests/integration/test_distributed.py, run as one process or under
`accelerate launch --num_processes 2` (gloo on CPU):

    python ddp_child.py sft|rl WORKDIR MODEL_DIR MAX_STEPS

Rank 0 writes WORKDIR/result.json: the loss per optimizer step and where the model went.
SLOW=seconds in the environment slows each step down, so the parent can kill the run between
checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from searchrl import distributed as dist  # noqa: E402
from searchrl.stage import setup_logging  # noqa: E402

SLOW = float(os.environ.get("SLOW", "0"))


def run_sft(work: Path, model_dir: Path, max_steps: int) -> list[tuple[int, float]]:
    from transformers import AutoModelForCausalLM, TrainerCallback

    from searchrl.agent.backends import encode
    from searchrl.agent.protocols import get_protocol
    from searchrl.agent.trajectory import Segment, Trajectory
    from searchrl.config import SftCfg
    from searchrl.models import load_tokenizer
    from searchrl.training import sft

    tok = load_tokenizer(str(model_dir))
    pp = get_protocol("r1searcher_pp")
    examples = []
    for i, (city, q) in enumerate([("Paris", "capital of France"), ("Lima", "capital of Peru"),
                                   ("Rome", "capital of Italy, the country shaped like a boot"),
                                   ("Oslo", "Norway")]):
        texts = [("model", f"<external>{q}</external>"), ("env", f"\n<document>\n(1) {q}: {city}\n</document>\n"),
                 ("model", f"<internal>{'I recall it. ' * i}</internal><answer>{city}</answer>")]
        p_text, p_ids = pp.prompt_ids(tok, f"What is the {q}?")
        segs = [Segment(r, t, encode(tok, t), [0.0] * len(encode(tok, t)) if r == "model" else None) for r, t in texts]
        examples.append(sft.sft_example(Trajectory(f"q{i}", q, pp.name, p_text, p_ids, segs)))
    # the global batch is the whole dataset (4 examples): every step sees the same examples whatever
    # the sampler order, so 1 and 2 processes must agree step by step
    cfg = SftCfg(epochs=max_steps, batch_size=4, micro_batch_size=2, lr=5e-3, warmup_ratio=0.0,
                 lr_scheduler="constant", logging_steps=1, save_steps=1, save_total_limit=3,
                 checkpoint_dir=str(work / "ckpt"), out_dir=str(work / "out"))

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            time.sleep(SLOW)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    summary = sft.train_sft(cfg, examples, model, tok, cfg.out_dir, device="cpu", callbacks=[Slow()])
    return [(h["step"], h["loss"]) for h in summary["log_history"] if "loss" in h]


class ParityBackend:
    """Deterministic 'policy': within each group, even samples search then answer correctly, odd ones
    answer wrongly at once, whatever the batch and the rank (the row's index within its group)."""

    def __init__(self, tokenizer, golds: dict[str, str], group: int):
        from searchrl.agent.backends import eos_token_ids

        self.tokenizer, self.golds, self.group = tokenizer, golds, group
        self.eos = sorted(eos_token_ids(tokenizer))

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, seed=None):
        from searchrl.agent.backends import Generation, decode, encode

        out = []
        for i, p in enumerate(prompts):
            text = decode(self.tokenizer, p)
            q = next(q for q in self.golds if q in text)
            if "<document>" in text.split("assistant")[-1]:
                seg = f"<answer>{self.golds[q]}</answer>"
            elif i % self.group == 0:
                seg = f"<external>{q}</external>"
            else:
                seg = "<answer>no idea</answer>"
            ids = encode(self.tokenizer, seg)
            which = next((s for s in stop if seg.endswith(s)), None)
            out.append(Generation(ids, seg, [-0.5] * len(ids), "stop" if which else "length", which))
        return out


def run_rl(work: Path, model_dir: Path, max_steps: int) -> list[tuple[int, float]]:
    from test_rl import PASSAGES, RECORDS, make_params

    from searchrl.agent.fakes import KeywordRetriever
    from searchrl.training import rl as RL

    G = 2
    golds = {r.question: r.answers[0] for r in RECORDS}
    RL.HFBackend = lambda model, tok, batch_size: ParityBackend(tok, golds, G)
    slow = RL.run_rollouts

    def run_rollouts(*a, **k):
        time.sleep(SLOW)
        return slow(*a, **k)

    RL.run_rollouts = run_rollouts
    params = make_params(work, model_dir, max_steps=max_steps, save_steps=1, num_generations=G,
                         prompts_per_step=2, micro_batch_size=1, beta=0.1, lr=1e-3, max_total_tokens=256)
    metrics = RL.train_rl(params, retriever=KeywordRetriever(PASSAGES))
    rows = json.loads((work / "reports" / "rl" / "metrics.json").read_text()) if dist.is_main() else {}
    assert metrics["steps"] == max_steps, (metrics, rows)
    import csv

    with open(work / "reports" / "rl" / "log.csv", encoding="utf-8") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def main() -> None:
    setup_logging()
    stage, work, model_dir, max_steps = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    losses = (run_sft if stage == "sft" else run_rl)(work, model_dir, max_steps)
    if dist.is_main():
        out = work / ("out" if stage == "sft" else "models/rl")
        (work / "result.json").write_text(json.dumps({"losses": losses, "model": str(out),
                                                      "world_size": dist.world_size()}))


if __name__ == "__main__":
    main()
