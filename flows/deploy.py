"""Scheduled retraining: serve the pipeline flow as a Prefect deployment on a cron schedule.

    prefect server start &                                 # UI: http://127.0.0.1:4200
    python -m flows.deploy                                 # cron from params.pipeline.retrain_cron
    python -m flows.deploy --cron "0 3 * * 0" --preset configs/smoke.yaml --set evaluate.top_k=5

It needs a real Prefect server: the temporary server that `python -m flows.pipeline` starts when
PREFECT_API_URL is unset has no scheduler, and Prefect refuses to serve against it. Which server:
PREFECT_API_URL when set (a server elsewhere); else the local `prefect server start` at the URL it
serves by default (http://127.0.0.1:4200/api, or PREFECT_SERVER_API_HOST / _PORT), waited for while it
is still starting (flows/server.py `local_server`). Neither answering is one line and exit 2. The process is
long-running: it registers the deployment `searchrl-pipeline/<name>` with its schedule, then polls
the server and runs each scheduled (or manually triggered: `prefect deployment run
searchrl-pipeline/retrain`) flow run in a subprocess, one at a time (DVC locks the workspace).
Stop it with Ctrl-C; the schedule is paused on shutdown. `make deploy PRESET=... CRON=...` wraps it;
docker/compose.yaml runs it as the `deploy` service next to a Prefect server.
"""

from __future__ import annotations

import argparse
import os
import sys

from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from pydantic import ValidationError

from flows.pipeline import check_before_run, searchrl_pipeline
from searchrl import services
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
    api_url = prefect_server()
    if api_url is None:
        return 2
    os.environ["PREFECT_API_URL"] = api_url  # the flow runs this process starts talk to the same server
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        serve(args, schedule, cron)
    return 0


def prefect_server() -> str | None:
    """The API URL to register with: PREFECT_API_URL when set and answering, else the local
    `prefect server start` (flows.server.local_server); None after printing one line saying what to do."""
    from flows.server import local_server, local_server_url

    url = get_current_settings().api.url
    if url:
        if services.probe(f"{url.rstrip('/')}/health", timeout_s=5.0):
            return url
        print(f"error: the Prefect server PREFECT_API_URL={url} does not answer {url.rstrip('/')}/health; start it, "
              "or unset PREFECT_API_URL to use a local `prefect server start`", file=sys.stderr)
        return None
    url = local_server()
    if url is None:
        print(f"error: no Prefect server at {local_server_url()} (PREFECT_API_URL is unset): start one with "
              "`prefect server start &`, or export PREFECT_API_URL=http://HOST:PORT/api for a server elsewhere; "
              "the temporary server of `python -m flows.pipeline` has no scheduler", file=sys.stderr)
        return None
    print(f"using the local Prefect server {url}", file=sys.stderr)
    return url


def serve(args: argparse.Namespace, schedule: CronSchedule, cron: str) -> None:
    searchrl_pipeline.serve(
        name=args.name,
        schedules=[schedule],
        parameters={"preset": args.preset, "overrides": args.overrides, "stages": args.stages},
        description=f"searchrl scheduled retraining ({args.preset or 'params.yaml'}, cron '{cron}')",
        tags=["searchrl", "retrain"],
        limit=1,  # one pipeline run at a time: DVC locks the workspace
        entrypoint_type=EntrypointType.MODULE_PATH,  # import flows.pipeline, whatever the cwd
    )


if __name__ == "__main__":
    sys.exit(main())
