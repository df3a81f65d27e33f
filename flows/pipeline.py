"""Prefect flow: the DVC stages in order, one Prefect task per stage, under one MLflow parent run.

    python -m flows.pipeline                                   # whole pipeline on params.yaml
    python -m flows.pipeline --preset configs/smoke.yaml       # a preset, in runs/smoke/
    python -m flows.pipeline --set evaluate.top_k=5 --stages prepare index

Each task shells out to `dvc repro <stage>` in the workspace (`searchrl.workspace`: the project root,
or runs/<preset>/ for a preset or overrides), so DVC decides what is stale from dvc.lock: a second run
with nothing changed reruns nothing and the task logs DVC's own "Stage 'x' didn't change, skipping".
It runs DVC through `python -m searchrl.runcache`, DVC's run-cache over the cache all workspaces share:
a stale stage whose command, dependencies and params match an earlier run in any workspace is checked
out of the cache instead of run ("Stage 'x' is cached - skipping run"), e.g. everything upstream of rl
in a fresh `--set rl.lr=...` workspace.
Tasks use NO_CACHE (Prefect must not second-guess DVC) and retry `params.pipeline.retries` times,
except after a user error (a stage exits 2 on a bad config, bad input or failed Great Expectations
suite: retrying cannot help). A failing stage fails the flow with the stage's own error message and
nothing downstream runs; the stage publishes its outputs atomically, so the previous ones survive.

The flow opens the MLflow parent run and hands its id to the stages (SEARCHRL_PARENT_RUN_ID), which
nest their runs under it. After `evaluate` it publishes the evaluation table as a markdown artifact.
A run holds its workspace's lock (`searchrl.workspace.workspace_lock`) from writing the workspace to
its last stage: a second run of the same preset waits for it instead of racing on its files.

With `retrieval.serve.managed: true` the flow also runs the retrieval server for the run
(`retrieval_service`): started once, before the first stage that searches (sample, rl, evaluate) and
will run, on the index the index stage just built; every stage then reaches it at retrieval.url; it
is stopped when the run ends (log: <workspace>/logs/retrieval_server.log). With `retrieval.url` set
and `managed: false`, the stages use that existing server and `main` checks it answers first.

An RL stage in vLLM server mode (`rl.vllm_mode: server`) with `vllm_server.managed: true` runs beside
the policy's vLLM server (`stage_services`): the flow starts `vllm serve` on `vllm_server.gpus`, waits
for its /health, runs the stage against it (TRL syncs the weights into it every step) and stops it
with its process group when the stage ends, fails or is interrupted; the log is in the workspace's
`logs/vllm_server_<stage>.log`.

Before the flow starts, `main` checks the config (one line and exit 2 on a bad preset, override,
model name or device: `searchrl.models.check_models`) and the MLflow tracking server (a few seconds'
health check, one line naming the URI and exit 2 when it is down).

Runs locally with no server: `main` starts a temporary Prefect API server tied to its own life
(flows/server.py: stopped on exit and killed by the kernel if the flow process dies). Point
PREFECT_API_URL at a `prefect server start` server to keep the runs in its UI.
"""

from __future__ import annotations

import os

# Before Prefect reads its settings: offline, no telemetry, quiet server logs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
# The temporary server migrates a fresh database on first start: 20 s (the default) is short on a
# busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.exceptions import TerminationSignal  # noqa: E402

from searchrl import tracking  # noqa: E402
from searchrl.config import load_params, project_root  # noqa: E402
from searchrl.errors import ConfigError, SearchRLError  # noqa: E402
from searchrl.workspace import make_workspace, plan_workspace, workspace_lock  # noqa: E402

USER_ERROR_EXIT = 2  # searchrl.stage.run_stage: bad config / input / failed validation
RAN = re.compile(r"^Running stage '([^']+)'")
CACHED = re.compile(r"^Stage '([^']+)' is cached - skipping run")
ERROR_LINE = re.compile(r"^(\S+: error: |ERROR: |[A-Za-z_.]*(Error|Exception): )")


class StageFailed(RuntimeError):
    """`dvc repro <stage>` exited non-zero; the message carries the stage's own error lines."""

    def __init__(self, stage: str, returncode: int, message: str, user_error: bool):
        self.stage, self.returncode, self.user_error = stage, returncode, user_error
        super().__init__(message)


def dvc_stages(workspace: Path) -> list[str]:
    """The pipeline's stages, upstream first (DVC's graph; ties in dvc.yaml order). A `foreach`
    stage expands to one stage per item, named `<stage>@<key>`."""
    import networkx as nx
    from dvc.repo import Repo

    listed = list((yaml.safe_load((workspace / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {}))

    def position(stage) -> tuple[int, str]:
        return listed.index(stage.name.split("@", 1)[0]), stage.name

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph.reverse()  # DVC's edges point from a stage to the stages it needs
        named = [s for s in graph if getattr(s, "name", None) and s.name.split("@", 1)[0] in listed]
        return [s.name for s in nx.lexicographical_topological_sort(graph.subgraph(named), key=position)]


def stage_env(workspace: Path, parent_run_id: str | None, tracking_uri: str | None) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # `python` in stage commands = this interpreter
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["SEARCHRL_ROOT"] = str(project_root())
    env["PYTHONUNBUFFERED"] = "1"  # stream stage logs live
    env.setdefault("TQDM_MININTERVAL", "5")  # progress bars in a log: a line every few seconds
    if parent_run_id:
        env["SEARCHRL_PARENT_RUN_ID"] = parent_run_id
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def _retry_unless_user_error(task, task_run, state) -> bool:
    return not getattr(state.data, "user_error", False)


@task(cache_policy=NO_CACHE, task_run_name="dvc-repro-{stage}", retry_condition_fn=_retry_unless_user_error)
def repro_stage(stage: str, workspace: str, env: dict[str, str]) -> dict:
    """`dvc repro <stage>` in the workspace (with the run-cache: searchrl.runcache), its output streamed
    into the Prefect log line by line. Returns what DVC ran and what it restored from the run-cache."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "searchrl.runcache", "repro", stage]
    logger.info("$ dvc repro %s   (in %s)", stage, workspace)
    t0 = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    errors: list[str] = []
    ran: list[str] = []
    restored: list[str] = []
    # its own process group: a flow that is stopped (Ctrl-C, SIGTERM) interrupts the whole stage with it
    with subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, errors="replace", start_new_session=True) as proc:
        try:
            for line in proc.stdout:  # text mode splits on \r too: tqdm updates arrive as lines
                line = line.rstrip()
                if not line:
                    continue
                logger.info(line)
                tail.append(line)
                if m := RAN.match(line):
                    ran.append(m.group(1))
                if m := CACHED.match(line):
                    restored.append(m.group(1))
                if ERROR_LINE.match(line):
                    errors.append(line)
        except BaseException:
            interrupt(proc)
            raise
    if proc.returncode != 0:
        user_error = re.search(rf"exited with {USER_ERROR_EXIT}\b", "\n".join(tail)) is not None
        detail = "\n".join(errors) if errors else "\n".join(tail)
        raise StageFailed(stage, proc.returncode,
                          f"stage '{stage}' failed (dvc repro exit {proc.returncode}):\n{detail}", user_error)
    seconds = round(time.perf_counter() - t0, 1)
    state = "ran" if stage in ran else "restored from the run-cache" if stage in restored else "up to date"
    logger.info("stage %s: %s in %.1fs", stage, state, seconds)
    return {"stage": stage, "ran": ran, "restored": restored, "up_to_date": stage not in ran + restored,
            "seconds": seconds}


def interrupt(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Stop a stage's process group as Ctrl-C would (SIGINT: the stage ends its MLflow run KILLED and
    drops its temp outputs), SIGKILL after `grace_s` seconds."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def rl_ablation_of(stage: str) -> tuple[bool, str | None]:
    """(is an RL stage, its ablation name): rl -> (True, None), rl_ablation@x -> (True, 'x')."""
    if stage == "rl":
        return True, None
    if stage.startswith("rl_ablation@"):
        return True, stage.split("@", 1)[1]
    return False, None


def stage_up_to_date(workspace: Path, stage: str) -> bool:
    """True when DVC would skip the stage (`dvc status <stage>` reports nothing); False when it would
    run or DVC cannot tell."""
    from dvc.repo import Repo

    try:
        with Repo(str(workspace)) as repo:
            return not repo.status(targets=[stage])
    except Exception:  # noqa: BLE001 (unknown: assume it runs, so it gets what it needs)
        return False


def vllm_server_model(params, ablation: str | None, workspace: Path) -> str:
    """The model the managed server starts with: vllm_server.model, else the run's RL init (a workspace
    path such as models/sft, an embedded alias or a hub id). TRL pushes the training weights into it
    before every step; its architecture and tokenizer must be the policy's."""
    from searchrl.models import causal_lm_path

    name = params.vllm_server.model or params.rl_config(ablation).init
    local = workspace / name
    return str(local.resolve()) if local.exists() else causal_lm_path(name)


@contextlib.contextmanager
def stage_services(params, stage: str, workspace: Path, env: dict[str, str], logger=None):
    """What a stage needs running while it runs. An RL stage in vLLM server mode (`rl.use_vllm`,
    `rl.vllm_mode: server`) with `vllm_server.managed` gets the policy's vLLM server: started with
    `vllm_server.command` on `vllm_server.gpus` (searchrl.agent.vllm_server.serve_command), its GET /health
    awaited, stopped with its whole process group when the stage ends, fails or is interrupted (the
    `with` block; the kernel's parent-death signal if the flow itself is killed). Output in
    <workspace>/<vllm_server.log_dir>/vllm_server_<stage>.log. A stage DVC will skip starts nothing."""
    from searchrl import services
    from searchrl.agent.vllm_server import serve_command, serve_env

    is_rl, ablation = rl_ablation_of(stage)
    srv = params.vllm_server
    cfg = params.rl_config(ablation) if is_rl else None
    if cfg is None or not (srv.managed and cfg.use_vllm and cfg.vllm_mode == "server"):
        yield None
        return
    logger = logger or get_run_logger()
    if stage_up_to_date(workspace, stage):
        logger.info("stage %s is up to date: no vLLM server started", stage)
        yield None
        return
    url = srv.base_url()
    if services.probe(f"{url}/health", timeout_s=2.0):
        raise services.ServiceError(f"vllm_server: something already answers {url}/health; stop it or change "
                                    "vllm_server.port (the flow starts its own server there)")
    cmd = serve_command(srv, vllm_server_model(params, ablation, workspace), params.policy.dtype)
    log_path = workspace / srv.log_dir / f"vllm_server_{stage.replace('@', '_')}.log"
    logger.info("vLLM server for %s on GPUs %s: %s (log %s)", stage, srv.gpus or "(inherited)",
                services.redacted(cmd), log_path)
    t0 = time.perf_counter()
    with services.running(cmd, f"{url}/health", env={**env, **serve_env(srv)}, log_path=log_path, cwd=workspace,
                          timeout_s=srv.startup_timeout_s, name=f"vLLM server ({stage})",
                          grace_s=srv.stop_grace_s) as service:
        logger.info("vLLM server for %s answers %s after %.0fs (pid %d)", stage, url, time.perf_counter() - t0,
                    service.pid)
        try:
            yield service
        finally:
            logger.info("stopping the vLLM server of %s", stage)


SEARCHING_STAGES = ("sample", "rl", "rl_ablation", "evaluate")  # the stages that call the retriever


def searches(stage: str) -> bool:
    return stage.split("@", 1)[0] in SEARCHING_STAGES


def retrieval_service(params, stage: str, workspace: Path, env: dict[str, str], run_scope: contextlib.ExitStack,
                      started: dict, logger=None):
    """The run's retrieval server (`retrieval.serve.managed`), started on first need: before the first
    stage that searches and will run (DVC would not skip it), after the index stage, so it serves the
    index this run built. `python -m searchrl.retrieval.serve --index <index.out_dir>` in the workspace,
    its GET /health awaited (the index is loaded then), kept for the rest of the run and stopped with
    its process group by `run_scope` when the run ends, fails or is interrupted (the kernel's parent-
    death signal if the flow itself is killed). Log: <workspace>/<retrieval.serve.log_dir>/
    retrieval_server.log. `started` remembers the service across stages. Returns it, or None."""
    from searchrl import services
    from searchrl.retrieval.serve import serve_command

    srv = params.retrieval.serve
    if not srv.managed or not searches(stage):
        return None
    if "service" in started:
        return started["service"]
    logger = logger or get_run_logger()
    if stage_up_to_date(workspace, stage):
        logger.info("stage %s is up to date: no retrieval server needed for it", stage)
        return None
    url = srv.base_url()
    if services.probe(f"{url}/health", timeout_s=2.0):
        raise services.ServiceError(f"retrieval.serve: something already answers {url}/health; stop it or change "
                                    "retrieval.serve.port (the flow starts its own server there), or point "
                                    "retrieval.url at it with retrieval.serve.managed: false")
    index_dir = (workspace / params.index.out_dir).resolve()
    cmd = serve_command(params, str(index_dir))
    log_path = workspace / srv.log_dir / "retrieval_server.log"
    logger.info("retrieval server for the run: %s (log %s)", services.redacted(cmd), log_path)
    t0 = time.perf_counter()
    service = run_scope.enter_context(services.running(
        cmd, f"{url}/health", env=env, log_path=log_path, cwd=workspace, timeout_s=srv.startup_timeout_s,
        name="retrieval server", grace_s=srv.stop_grace_s))
    logger.info("retrieval server answers %s after %.0fs (pid %d)", url, time.perf_counter() - t0, service.pid)
    run_scope.callback(logger.info, "stopped the retrieval server (log %s)", log_path)
    started["service"] = service
    return service


def publish_evaluation(workspace: Path, out_dir: str, label: str) -> str | None:
    """The evaluation table (methods x datasets: EM / F1 / CEM / retrievals) as a Prefect artifact."""
    from searchrl.evaluation import markdown_table

    path = workspace / out_dir / "metrics.json"
    if not path.exists():
        get_run_logger().warning("no %s: nothing to publish", path)
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    table = markdown_table(metrics)
    markdown = f"# searchrl evaluation ({label})\n\n{table}\n\nfrom `{path}`\n"
    key = re.sub(r"[^a-z0-9-]+", "-", f"searchrl-eval-{label}".lower()).strip("-")
    create_markdown_artifact(markdown=markdown, key=key, description=f"evaluation table, {label}")
    get_run_logger().info("evaluation:\n%s", table)
    return table


@flow(name="searchrl-pipeline", log_prints=True)
def searchrl_pipeline(preset: str | None = None, overrides: list[str] | None = None,
                      stages: list[str] | None = None) -> dict:
    """Run the DVC stages (all, or `stages`) on params.yaml + preset + overrides."""
    with workspace_lock(plan_workspace(preset, overrides).workspace):
        return _pipeline(preset, overrides, stages)


def _pipeline(preset: str | None, overrides: list[str] | None, stages: list[str] | None) -> dict:
    logger = get_run_logger()
    workspace = make_workspace(preset, overrides)
    params = load_params(workspace / "params.yaml")
    known = dvc_stages(workspace)
    selected = known if not stages else [s for s in known if s in stages]
    if unknown := sorted(set(stages or []) - set(known)):
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has: {', '.join(known)}")
    label = Path(preset).stem if preset else ("custom" if overrides else "params")
    logger.info("workspace %s; stages: %s", workspace, " -> ".join(selected))

    run_task = repro_stage.with_options(retries=params.pipeline.retries, retry_delay_seconds=5)
    results: dict[str, dict] = {}
    # The parent MLflow run: the stages (DVC subprocesses) nest under it via SEARCHRL_PARENT_RUN_ID.
    with tracking.stage_run("pipeline", params, run_name=f"pipeline-{label}") as parent:
        tracking.set_tags({"preset": label, "stages": ",".join(selected), "workspace": str(workspace),
                           "overrides": " ".join(overrides or [])})
        parent_id = parent.info.run_id
        env = stage_env(workspace, parent_id, tracking.tracking_uri(params))
        with contextlib.ExitStack() as run_scope:  # services that live for the whole run (retrieval)
            started: dict = {}
            for stage in selected:
                retrieval_service(params, stage, workspace, env, run_scope, started, logger)
                with stage_services(params, stage, workspace, env):
                    results[stage] = run_task(stage, str(workspace), env)
                # wall time per stage, comparable across runs in the MLflow UI ('@' is not a metric character)
                tracking.log_metrics({f"stage_seconds/{stage.replace('@', '.')}": results[stage]["seconds"]})
        ran = [s for r in results.values() for s in r["ran"]]
        restored = [s for r in results.values() for s in r["restored"]]
        # a restored stage logs no run of its own: the parent says which outputs came from the run-cache
        tracking.set_tags({"restored_stages": ",".join(restored)})
        table = publish_evaluation(workspace, params.evaluate.out_dir, label) if "evaluate" in selected else None
        if table:
            tracking.log_text(table + "\n", "evaluation.md")
    logger.info("DVC ran: %s", ", ".join(ran) if ran else "nothing (all stages up to date)"
                if not restored else "nothing")
    if restored:
        logger.info("restored from the run-cache (same command, inputs and params as an earlier run): %s",
                    ", ".join(restored))
    return {"workspace": str(workspace), "stages": selected, "ran": ran, "restored": restored,
            "parent_run_id": parent_id,
            "stage_seconds": {s: r["seconds"] for s, r in results.items()}, "evaluation": table}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", help="preset YAML deep-merged over params.yaml, e.g. configs/smoke.yaml")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override one value, e.g. --set evaluate.top_k=5 (repeatable)")
    ap.add_argument("--stages", nargs="+", metavar="STAGE", help="run these stages (and what they need)")
    args = ap.parse_args(argv)
    try:
        check_before_run(args.preset, args.overrides, args.stages)
    except SearchRLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flows.server import tied_server

    signal.signal(signal.SIGTERM, _terminate)  # clean up (server, stage, MLflow run) as on Ctrl-C
    try:
        with tied_server():
            state = searchrl_pipeline(preset=args.preset, overrides=args.overrides, stages=args.stages,
                                      return_state=True)
    except (KeyboardInterrupt, TerminationSignal):
        print("\npipeline interrupted", file=sys.stderr)
        return 130
    except SearchRLError as err:  # the temporary Prefect server did not come up
        print(f"error: {err}", file=sys.stderr)
        return 1
    if state.is_failed():
        print(f"\npipeline failed: {state.message}", file=sys.stderr)
        return 1
    return 0


def check_before_run(preset: str | None, overrides: list[str], stages: list[str] | None,
                     server: bool = True) -> None:
    """Everything that can be known wrong before any stage work, as one SearchRLError line: the preset
    and overrides (validated, nothing written), the model names and devices the stages load, the
    judge's API key variable, and (`server`) the MLflow tracking server."""
    from searchrl.models import check_models

    plan = plan_workspace(preset, overrides)
    check_models(plan.params, workdir=plan.workspace, stages=stages or None)
    if not stages or "evaluate" in stages:
        from searchrl.judge import check_judge

        check_judge(plan.params.evaluate.judge)  # the judge's API key variable is set
    if plan.params.vllm_server.managed and (not stages or any(rl_ablation_of(s)[0] for s in stages)):
        from searchrl.agent.vllm_server import serve_command

        serve_command(plan.params.vllm_server, "model", plan.params.policy.dtype)  # the executable exists
    ret = plan.params.retrieval
    if ret.url and not ret.serve.managed and (not stages or any(searches(s) for s in stages)):
        check_retrieval_service(ret)
    if server:
        tracking.check_server(tracking.tracking_uri(plan.params))


def check_retrieval_service(cfg) -> None:
    """An existing retrieval service (retrieval.url, not managed) must answer before the run starts."""
    from searchrl.retrieval.http import HTTPRetriever

    client = HTTPRetriever(cfg.url, api=cfg.api, timeout_s=min(cfg.timeout_s, 30.0), connect_timeout_s=5.0)
    if not client.health():
        what = "GET /health" if cfg.api == "searchrl" else "a probe POST /retrieve"
        raise ConfigError(f"retrieval.url: the retrieval service at {client.url} does not answer {what}; start it "
                          "(python -m searchrl.retrieval.serve --index <index dir>), fix the URL, or set "
                          "retrieval.serve.managed: true to let the flow start one")


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
