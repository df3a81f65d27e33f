"""DVC stages `rl` (the main R1-Searcher++ run) and `rl_ablation@<name>` (an overlay of rl_ablations).

    python -m tasks.rl                      # params.rl              -> models/rl
    python -m tasks.rl --ablation NAME      # params.rl + rl_ablations.NAME -> models/rl_NAME

Reads data/prepared/train.parquet, data/sft/difficulty.parquet (unless rl.difficulty is []), the
index and the init model; writes the model dir, <rl.metrics_dir>/<run>/{log.csv, metrics.json,
curves.png}. One MLflow run, named after the reward configuration (searchrl.training.rl.run_name),
with the effective rl section as params, a metric series per training step, and the model registered
as `searchrl-policy` with alias `rl` (main run) or `rl_<name>`.
"""

from __future__ import annotations

import logging

from searchrl import tracking
from searchrl.config import Params
from searchrl.errors import ConfigError
from searchrl.stage import run_stage, stage_args

log = logging.getLogger("searchrl.rl")


def effective(params: Params, ablation: str | None) -> Params:
    try:
        return params.model_copy(update={"rl": params.rl_config(ablation)})
    except ValueError as err:
        raise ConfigError(f"params.yaml: {err}") from None


def rl(params: Params, ablation: str | None) -> None:
    from searchrl import distributed
    from searchrl.training.rl import run_key, train_rl

    cfg = effective(params, ablation).rl
    key = run_key(ablation)
    metrics = train_rl(params, ablation, mlflow_log=tracking.log_metrics)
    if not distributed.is_main():  # rank 0 logs and registers
        return
    tracking.log_metrics({f"final.{k}": v for k, v in metrics["last5"].items() if v is not None})
    tracking.log_metrics({"final.steps": metrics["steps"],
                          "final.steps_per_hour": metrics["steps_per_hour"] or 0})
    tracking.log_artifact(f"{cfg.metrics_dir}/{key}")
    version = tracking.log_model_dir(cfg.out_dir, params.tracking.registered_model, alias=key)
    log.info("rl: %s -> %s (registered %s v%s @%s)", key, cfg.out_dir, params.tracking.registered_model,
             version.version, key)


def main(argv: list[str] | None = None) -> None:
    args = stage_args("tasks.rl", __doc__, argv, options=lambda parser: parser.add_argument(
        "--ablation", default=None, help="a name in params.yaml rl_ablations"))
    ablation = args.ablation
    from searchrl.training.rl import run_name

    run_stage("rl" if ablation is None else f"rl@{ablation}", lambda p: rl(p, ablation),
              inputs=["data/prepared/train.parquet", "data/sft/difficulty.parquet", "data/index",
                      "models/sft"],
              run_name=lambda p: run_name(effective(p, ablation).rl, ablation),
              tracked=lambda p: effective(p, ablation))


if __name__ == "__main__":
    main()
