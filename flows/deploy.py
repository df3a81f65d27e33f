"""Scheduled retraining: serve the pipeline flow as a Prefect deployment on a cron schedule.

    prefect server start                                   # terminal 1 (UI: http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api       # terminal 2
    python -m flows.deploy                                 # cron from params.pipeline.retrain_cron
    python -m flows.deploy --cron "0 3 * * 0" --preset configs/smoke.yaml --set evaluate.top_k=5

It needs a real Prefect server: the temporary server that `python -m flows.pipeline` starts when
PREFECT_API_URL is unset has no scheduler, and Prefect refuses to serve against it. The process is
long-running: it registers the deployment `searchrl-pipeline/<name>` with its schedule, then polls
the server and runs each scheduled (or manually triggered: `prefect deployment run
searchrl-pipeline/retrain`) flow run in a subprocess, one at a time (DVC locks the workspace).
Stop it with Ctrl-C; the schedule is paused on shutdown. `make deploy PRESET=... CRON=...` wraps it;
docker/compose.yaml runs it as the `deploy` service next to a Prefect server.
"""

from __future__ import annotations

import argparse
import sys

from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType
from prefect.settings import get_current_settings
from pydantic import ValidationError

from flows.pipeline import check_before_run, searchrl_pipeline
from searchrl.config import load_params, project_root
from searchrl.errors import SearchRLError
from searchrl.workspace import resolve_preset


def schedule_cron(preset: str | None, overrides: list[str], cron: str | None) -> str:
    """--cron, else params.pipeline.retrain_cron of params.yaml + preset + overrides (validated)."""
    root = project_root()
    params = load_params(root / "params.yaml", resolve_preset(preset, root) if preset else None, overrides)
    return cron or params.pipeline.retrain_cron


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cron", help="cron schedule (default: params.pipeline.retrain_cron)")
    ap.add_argument("--timezone", default="UTC", help="time zone the cron schedule is read in")
    ap.add_argument("--preset", help="preset YAML the scheduled runs use, e.g. configs/smoke.yaml")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--stages", nargs="+", metavar="STAGE", help="run only these stages (default: all)")
    ap.add_argument("--name", default="retrain", help="deployment name (default: retrain)")
    args = ap.parse_args(argv)
    if not get_current_settings().api.url:
        print("error: no Prefect server: start one (`prefect server start`) and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api; the temporary local server has no scheduler",
              file=sys.stderr)
        return 2
    try:
        # the tracking server is checked by each run (it may start after this process)
        check_before_run(args.preset, args.overrides, args.stages, server=False)
        cron = schedule_cron(args.preset, args.overrides, args.cron)
        schedule = CronSchedule(cron=cron, timezone=args.timezone)
    except SearchRLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:
        print(f"error: cron '{cron}' / timezone '{args.timezone}': {err.errors()[0]['msg']}", file=sys.stderr)
        return 2

    searchrl_pipeline.serve(
        name=args.name,
        schedules=[schedule],
        parameters={"preset": args.preset, "overrides": args.overrides, "stages": args.stages},
        description=f"searchrl scheduled retraining ({args.preset or 'params.yaml'}, cron '{cron}')",
        tags=["searchrl", "retrain"],
        limit=1,  # one pipeline run at a time: DVC locks the workspace
        entrypoint_type=EntrypointType.MODULE_PATH,  # import flows.pipeline, whatever the cwd
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
