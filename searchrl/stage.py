"""The one wrapper every DVC stage entry point (`python -m tasks.<stage>`) goes through.

It loads and validates params.yaml from the working directory, checks the model names and devices
the stage loads (`searchrl.models.check_models`), seeds everything, configures logging, opens the
stage's MLflow run (lineage tags: git commit, params hash, DVC hashes of the inputs; a health check
of a tracking server first) and turns user errors (`SearchRLError`: bad config, unknown model, missing
device, unreachable tracking server, bad input file, failed data validation) into one readable message
and exit code 2 instead of a traceback. Bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from collections.abc import Callable

from searchrl.config import Params, load_params
from searchrl.errors import SearchRLError


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("SEARCHRL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "filelock", "faiss", "sentence_transformers",
                  "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_args(module: str, doc: str | None, argv: list[str] | None = None,
               options: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The command line of a stage entry point (`python -m tasks.<stage> [--help]`), parsed before any
    work: `--help` prints the module's docstring and exits 0, an unknown argument is argparse's one-line
    error and exit 2. `options(parser)` adds the stage's own options (tasks.rl: --ablation)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Reads params.yaml in the working directory (the project root, or a runs/<preset>/ workspace). "
               "Usually run by `dvc repro <stage>` or `python -m flows.pipeline`, which rerun only what changed.")
    if options:
        options(parser)
    return parser.parse_args(argv)


def run_stage(stage: str, fn: Callable[[Params], None], inputs: list[str] = (),
              params_path: str = "params.yaml", run_name: Callable[[Params], str] | None = None,
              tracked: Callable[[Params], Params] | None = None) -> None:
    """`run_name(params)` names the MLflow run (default: the stage); `tracked(params)` is what the run
    logs as params (default: params itself, e.g. an ablation logs its effective rl section); `fn`
    always gets the params as loaded."""
    setup_logging()
    try:
        params = load_params(params_path)
        from searchrl.models import check_models

        check_models(params, stages=[stage])
        seed_everything(params.seed)
        from searchrl import distributed, tracking

        if not distributed.is_main():  # under `accelerate launch` only rank 0 tracks (MLflow, registry)
            fn(params)
            return
        with tracking.stage_run(stage, tracked(params) if tracked else params, inputs=list(inputs),
                                run_name=run_name(params) if run_name else None):
            fn(params)
    except SearchRLError as err:
        print(f"\n{stage}: error: {err}\n", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if not type(err).__module__.startswith("mlflow"):
            raise
        # the tracking server failed mid-stage (it passed the start-up health check): one line
        import mlflow

        from searchrl.tracking import scrub

        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        print(f"\n{stage}: error: MLflow tracking at {scrub(mlflow.get_tracking_uri())} "
              f"failed: {scrub(first)[:300]}\n", file=sys.stderr)
        sys.exit(2)
