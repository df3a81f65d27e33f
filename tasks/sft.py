"""DVC stage `sft`: masked SFT of the policy on the sampled trajectories (searchrl/training/sft.py).

Reads <sample.out_dir>/trajectories.jsonl; writes <sft.out_dir>/ (Hugging Face dir: safetensors +
tokenizer, published atomically), reports/sft/metrics.json (DVC metrics), reports/sft/loss.csv and
reports/sft/loss.png (DVC plots). MLflow: the trainer's params and loss curve go to the stage run
(through `searchrl.tracking.trainer_callback`, which scrubs secrets like every other MLflow call), and
the model is registered as `tracking.registered_model` with alias `sft`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd

from searchrl import distributed, tracking
from searchrl.config import Params
from searchrl.io import atomic_path, write_json
from searchrl.stage import run_stage, stage_args
from searchrl.training import sft as sftlib
from searchrl.training.sampling import tokenizer_fingerprint

log = logging.getLogger("searchrl.sft")

REPORTS = Path("reports/sft")


def sft(params: Params) -> dict:
    import mlflow

    from searchrl.models import load_causal_lm

    cfg = params.sft
    t0 = time.perf_counter()
    # float32 master weights; a bfloat16 policy trains with bf16 autocast on CUDA (mixed precision)
    model, tok = load_causal_lm(params.policy.model, dtype="float32", device=params.policy.device)
    rows = sftlib.read_trajectories(Path(params.sample.out_dir) / "trajectories.jsonl")
    examples, counts = sftlib.build_examples(rows, tok, tokenizer_fingerprint(tok), cfg.max_length)
    log.info("sft: %d examples (%d with the policy's own token ids, %d re-tokenised, %d longer than %d dropped), "
             "%d tokens, %d in the loss", counts["examples"], counts["exact_ids"], counts["retokenised"],
             counts["too_long"], cfg.max_length, counts["tokens"], counts["loss_tokens"])
    summary = sftlib.train_sft(cfg, examples, model, tok, cfg.out_dir, seed=params.seed, device=params.policy.device,
                               dtype=params.policy.dtype, model_name=params.policy.model, report_to="none",
                               callbacks=[tracking.trainer_callback()] if mlflow.active_run() else [])
    if not distributed.is_main():  # under `accelerate launch`, rank 0 writes reports and registers
        return {}
    curve = sftlib.loss_curve(summary.pop("log_history"))
    with atomic_path(REPORTS / "loss.csv") as tmp:
        pd.DataFrame(curve, columns=["step", "epoch", "loss", "learning_rate"]).to_csv(tmp, index=False)
    sftlib.plot_loss(curve, REPORTS / "loss.png")
    metrics = {**counts, **{k: v for k, v in summary.items() if not (isinstance(v, float) and math.isnan(v))},
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    write_json(REPORTS / "metrics.json", metrics)
    if mlflow.active_run():
        tracking.log_metrics(tracking.flatten({"sft": metrics}))
        tracking.log_artifact(REPORTS / "loss.png")
        version = tracking.log_model_dir(cfg.out_dir, params.tracking.registered_model, alias="sft")
        log.info("sft: registered %s version %s (alias sft)", params.tracking.registered_model, version.version)
    sftlib.clear_checkpoints(cfg.checkpoint_dir)
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_args("tasks.sft", __doc__, argv)
    run_stage("sft", sft, inputs=["data/sft/trajectories.jsonl"])


if __name__ == "__main__":
    main()
