"""MLflow conventions: one run per stage, params + lineage tags, model registry with aliases.

    with stage_run("sft", params, inputs=["data/sft/train.parquet"]) as run:
        ...train...
        log_metrics({"train/loss": 0.4}, step=10)
        log_model_dir("models/sft", params.tracking.registered_model, alias="sft")

Where runs go: `MLFLOW_TRACKING_URI` if set (taken verbatim), else `params.tracking.uri`; a relative
`sqlite:///x.db` there is resolved against the project root, so DVC stages run from any working
directory (runs/<preset>/) share one store, and the experiment's artifacts go to `mlruns/` next to
that database. Experiment: `params.tracking.experiment`.

Every stage run carries
- params: the stage's section of params.yaml plus the shared sections (seed, policy, agent), flattened
  to dotted keys (`sft.lr`, `policy.model`);
- tags: `stage`, `git_commit`, `git_dirty`, `params_hash` (`searchrl.io.stable_hash` of the stage's
  section) and `dvc.dep.<path>` per input: its DVC md5 (see `dvc_md5`).
`pipeline_run` opens the parent run of a whole pipeline (the Prefect flow). A run started while
another is active (in-process), or with `SEARCHRL_PARENT_RUN_ID` set (the flow's run id, for stages
DVC runs as subprocesses), is nested under it.

Secrets: every string this module sends to MLflow (params, tags, run names, metric keys, texts and
the text files of artifacts) goes through `scrub` first: values of environment variables whose names
look secret (*KEY*, *TOKEN*, *SECRET*, *PASSW*, *CREDENTIAL*, *AUTH*, plus the variable that
`sample.teacher_api_key_env` and `evaluate.judge.api_key_env` name), credentials inside URLs (`https://user:pass@host`) and
`?key=`/`token=`/`password=`-style query values become ***. Nothing else in the project calls mlflow
directly (the SFT trainer logs through `trainer_callback`, not transformers' own MLflow callback).

Server: an http(s) tracking URI is health-checked once per process before the first run
(`check_server`, a few seconds): a server that is down or refuses this host is one `TrackingError`
line naming the URI (stages exit 2, so the flow does not retry them), not a 4-minute retry loop.

Killed runs: each run records the pid, its start time and the host of the process that opened it
(`searchrl.pid`, `searchrl.pid_start`, `searchrl.host`) and a `searchrl.resume_key` (stage, run
name, every logged param, the DVC hashes of its inputs). At the start of a stage, RUNNING runs of the
same stage whose process is gone from this host are orphans: the newest one with the same resume key
is resumed (the rerun of a killed stage continues the killed run: its metric history, now RUNNING
again, nested under the new parent), the others are marked KILLED. `log_metrics` with a step skips
(key, step) pairs the run already has, so a trainer that replays its checkpointed log history into a
resumed run adds only what is missing.

mlflow is imported inside the functions (about 2 s), so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import os
import posixpath
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from searchrl.config import Params, project_root
from searchrl.errors import TrackingError
from searchrl.io import pid_alive, stable_hash

log = logging.getLogger(__name__)

PARENT_ENV = "SEARCHRL_PARENT_RUN_ID"
SHARED_SECTIONS = ("seed", "policy", "agent")
PID_TAG, PID_START_TAG, HOST_TAG = "searchrl.pid", "searchrl.pid_start", "searchrl.host"
RESUME_TAG = "searchrl.resume_key"
HEALTH_TIMEOUT_S = 5.0
_OFFLINE_ENV = {
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",  # no `pip install --dry-run` when logging models
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # a server that passes /health and then fails: MLflow's defaults (7 retries, backoff factor 2, 120 s
    # timeout) hang a stage for minutes; these give up in ~10 s (each can be set in the environment)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH(?!OR)", re.IGNORECASE)  # not GIT_AUTHOR_*
_URL_USERINFO = re.compile(r"(?<=://)[^/\s@:]+:[^/\s@]+(?=@)")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|secret|password|passwd|pwd|"
                           r"auth|sig|signature)=)[^&#\s]+")
_TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".md", ".txt", ".yaml", ".yml", ".log", ".html", ".py",
                  ".cfg", ".ini", ".toml", ".jinja"}
_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")
_secret_env_names: set[str] = set()  # extra variables named by params (teacher / judge api_key_env)
_checked_servers: set[str] = set()
_logged_steps: dict[str, set[tuple[str, int]]] = {}  # run id -> (metric key, step) already in the run


# ----------------------------------------------------------------------------- setup
def tracking_uri(params: Params) -> str:
    """The store URI. Note `mlflow.set_tracking_uri` (called by `configure`) exports it as
    MLFLOW_TRACKING_URI, so processes a flow starts (DVC stages) inherit the resolved store."""
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    uri = params.tracking.uri
    if uri.startswith("sqlite:///") and not uri.removeprefix("sqlite:///").startswith("/"):
        uri = "sqlite:///" + str(project_root() / uri.removeprefix("sqlite:///"))
    return uri


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """For an http(s) tracking URI: GET <uri>/health once (per process and URI); TrackingError naming
    the URI unless it answers 200 within `timeout` seconds. Other URIs (sqlite, file) pass."""
    if not uri.startswith(("http://", "https://")) or uri in _checked_servers:
        return
    shown = scrub(uri)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {shown} is not reachable ({reason}); start it (e.g. "
                            "`docker compose -f docker/compose.yaml up -d mlflow`) or unset MLFLOW_TRACKING_URI "
                            "to log to the local sqlite store") from None
    if status != 200:
        why = " (a 403 means its --allowed-hosts does not list this host name)" if status == 403 else ""
        raise TrackingError(f"MLflow tracking server {shown} answered HTTP {status} to /health{why}")
    _checked_servers.add(uri)


def configure(params: Params) -> str:
    """Point mlflow at the store and experiment of `params` (health-checking a server first); returns
    the experiment id."""
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    _secret_env_names.update(n for n in (params.sample.teacher_api_key_env, params.evaluate.judge.api_key_env)
                             if n)
    uri = tracking_uri(params)
    check_server(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    if uri.startswith("sqlite:///"):
        # a fresh store is created and migrated by the first process that touches it: two stages of
        # different presets doing that at once race in alembic ("duplicate column name")
        from filelock import FileLock

        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(db.with_name(f".{db.name}.init.lock")):
            exp = mlflow.get_experiment_by_name(name)
    else:
        exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):  # else mlflow would use ./mlruns of the current directory
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
        try:
            exp_id = mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another stage
            exp_id = mlflow.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# ----------------------------------------------------------------------------- runs
class ParentRun(NamedTuple):
    run_id: str
    experiment_id: str


@contextlib.contextmanager
def stage_run(stage: str, params: Params, inputs: Iterable[str] = (), run_name: str | None = None,
              section: str | None = None) -> Iterator[Any]:
    """Start the MLflow run of `stage` and yield it (`mlflow.ActiveRun`); on an exception the run
    ends FAILED (KILLED on Ctrl-C).

    `section` is the params section to log (default: `stage` up to any `@`, e.g. "rl@pp" -> "rl";
    only the shared sections if params has no such section)."""
    section = section or stage.split("@", 1)[0]
    stage_params = _dump(params, section)
    tags = {"stage": stage, **git_info(), "params_hash": stable_hash(stage_params)}
    tags.update({_dep_key(p): dvc_md5(p) for p in inputs})
    flat = flatten({k: _dump(params, k) for k in SHARED_SECTIONS})
    if section in type(params).model_fields and section not in SHARED_SECTIONS:
        flat.update(flatten({section: stage_params}))
    with _run(params, run_name or stage, tags, flat) as run:
        yield run


@contextlib.contextmanager
def pipeline_run(params: Params, name: str = "pipeline", workspace: str | os.PathLike | None = None,
                 tags: Mapping[str, str] | None = None) -> Iterator[ParentRun]:
    """The parent run of a whole pipeline (the Prefect flow): every params section, `params_hash` of
    all params, git tags. Yields `ParentRun(run_id, experiment_id)`; hand `run_id` to the stages via
    the SEARCHRL_PARENT_RUN_ID environment variable."""
    all_params = params.model_dump(mode="json")
    run_tags = {"stage": "pipeline", **git_info(), "params_hash": stable_hash(all_params), **(tags or {})}
    if workspace is not None:
        run_tags["workspace"] = str(workspace)
    with _run(params, name, run_tags, flatten(all_params)) as run:
        yield ParentRun(run.info.run_id, run.info.experiment_id)


@contextlib.contextmanager
def _run(params: Params, run_name: str, tags: Mapping[str, Any], flat_params: Mapping[str, Any]) -> Iterator[Any]:
    import mlflow

    exp_id = configure(params)
    active = mlflow.active_run()
    parent = active.info.run_id if active is not None else os.environ.get(PARENT_ENV) or None
    run_name = scrub(run_name)
    flat = scrub_mapping(flat_params)
    tags = {k: str(v) for k, v in scrub_mapping(tags).items()}
    resume_key = stable_hash([tags.get("stage"), run_name, {k: str(v) for k, v in flat.items()},
                              sorted((k, v) for k, v in tags.items() if k.startswith("dvc.dep."))])
    tags.update({PID_TAG: str(os.getpid()), PID_START_TAG: _process_start(os.getpid()), HOST_TAG: _host(),
                 RESUME_TAG: resume_key})
    resume_id = settle_orphans(exp_id, tags.get("stage", ""), resume_key)
    if resume_id is not None:
        log.info("MLflow: continuing run %s of the killed '%s' process", resume_id, tags.get("stage"))
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = mlflow.start_run(run_id=resume_id, run_name=run_name, nested=active is not None, tags=tags)
        _logged_steps[resume_id] = _steps_in(resume_id)
    else:
        run = mlflow.start_run(run_name=run_name, nested=active is not None,
                               parent_run_id=None if active is not None else parent, tags=tags)
        _logged_steps[run.info.run_id] = set()
    try:
        log_params(flat)
        yield run
    except BaseException as err:
        # an error fails the run; Ctrl-C, SIGTERM (Prefect's TerminationSignal) or an exit kill it
        mlflow.end_run(status="FAILED" if isinstance(err, Exception) else "KILLED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
    finally:
        _logged_steps.pop(run.info.run_id, None)


def settle_orphans(experiment_id: str, stage: str, resume_key: str | None = None) -> str | None:
    """Close the orphaned runs of `stage`: RUNNING runs whose recording process (pid + start time, on
    this host) is gone. The newest orphan with `resume_key` is left RUNNING and its id returned (the
    caller resumes it); every other orphan is marked KILLED. Runs of live processes, of other hosts,
    or without the pid tags are left alone."""
    from mlflow import MlflowClient

    client = MlflowClient()
    quoted = stage.replace("'", "\\'")
    runs = client.search_runs([experiment_id], f"tags.stage = '{quoted}' and attributes.status = 'RUNNING'",
                              max_results=500, order_by=["attributes.start_time DESC"])
    resume = None
    for r in runs:
        t = r.data.tags
        if t.get(HOST_TAG) != _host() or not t.get(PID_TAG, "").isdigit():
            continue
        pid, started = int(t[PID_TAG]), t.get(PID_START_TAG, "")
        if pid_alive(pid) and (not started or _process_start(pid) in ("", started)):
            continue  # its process still runs (a recycled pid has another start time)
        if resume is None and resume_key is not None and t.get(RESUME_TAG) == resume_key:
            resume = r.info.run_id
            continue
        client.set_terminated(r.info.run_id, status="KILLED")
        client.set_tag(r.info.run_id, "searchrl.orphaned", f"process {pid} on {_host()} ended without closing it")
        log.warning("MLflow: run %s (%s) was left RUNNING by process %d, which no longer runs: marked KILLED",
                    r.info.run_id, stage, pid)
    return resume


def _steps_in(run_id: str) -> set[tuple[str, int]]:
    from mlflow import MlflowClient

    client = MlflowClient()
    return {(key, m.step) for key in client.get_run(run_id).data.metrics
            for m in client.get_metric_history(run_id, key)}


def _host() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> str:
    """The process's start time (seconds since the epoch, 2 decimals), which tells a recycled pid
    from the process that recorded it; "" where it cannot be read."""
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.2f}"
    except Exception:  # no such process, or no psutil: the pid alone decides
        return ""


def _dump(params: Params, section: str) -> Any:
    value = getattr(params, section, None)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


# ----------------------------------------------------------------------------- logging helpers
def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric entries (nested dicts flattened, bools as 0/1); others are skipped. With a
    `step`, keys the run already has at that step are skipped (a replayed history adds only what is
    missing). Does nothing outside a run."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    numeric = {_key(scrub(k)): float(v) for k, v in flatten(metrics).items() if isinstance(v, numbers.Number)}
    if step is not None:
        seen = _logged_steps.setdefault(run.info.run_id, set())
        numeric = {k: v for k, v in numeric.items() if (k, step) not in seen}
        seen.update((k, step) for k in numeric)
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_params(values: Mapping[str, Any]) -> None:
    """Log params (scrubbed, values cut to MLflow's 6000 characters); keys the run already has are
    skipped, so a resumed run keeps its values. Does nothing outside a run."""
    import mlflow
    from mlflow import MlflowClient

    run = mlflow.active_run()
    if run is None:
        return
    have = MlflowClient().get_run(run.info.run_id).data.params
    new = {_key(k): str(v)[:6000] for k, v in scrub_mapping(values).items() if _key(k) not in have}
    if new:
        mlflow.log_params(new)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run (scrubbed). Does nothing outside a run."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags({k: str(v) for k, v in scrub_mapping(tags).items()})


def log_text(text: str, artifact_file: str) -> None:
    """Write `text` (scrubbed) as an artifact file of the active run. Does nothing outside a run."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_text(scrub(text), artifact_file)


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log a file, or a directory under its own name; text files are scrubbed on the way (the local
    files are untouched). Does nothing outside a run."""
    import mlflow

    if mlflow.active_run() is None:
        return
    p = Path(path)
    with _scrubbed(p) as upload:
        if p.is_dir():
            mlflow.log_artifacts(str(upload), artifact_path=artifact_path or p.name)
        else:
            mlflow.log_artifact(str(upload), artifact_path=artifact_path)


def log_model_dir(path: str | os.PathLike, registered_name: str, alias: str | None = None,
                  artifact_path: str = "model") -> Any:
    """Upload a saved Hugging Face model directory as artifacts of the active run (text files
    scrubbed), register it as a new version of `registered_name` and point `alias` at it. Returns the
    ModelVersion.

    No MLflow model flavor is written: consumers load `models:/<name>@<alias>` by downloading the
    directory (`mlflow.artifacts.download_artifacts`) and calling `from_pretrained` on it."""
    import mlflow
    from mlflow import MlflowClient

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model_dir() needs an active run (use it inside stage_run)")
    with _scrubbed(Path(path)) as upload:
        mlflow.log_artifacts(str(upload), artifact_path=artifact_path)
    version = mlflow.register_model(mlflow.get_artifact_uri(artifact_path), registered_name,
                                    tags={"run_id": run.info.run_id})
    if alias:
        MlflowClient().set_registered_model_alias(registered_name, alias, version.version)
    return version


def trainer_callback():
    """A transformers TrainerCallback that logs the trainer's arguments as params and every logged
    step as metrics through this module (scrubbed), in place of transformers' own MLflow callback.
    At the start of a resumed training it replays the checkpoint's log history (steps the run already
    has are skipped)."""
    from transformers import TrainerCallback

    class MlflowLogger(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            log_params(args.to_sanitized_dict())
            for entry in state.log_history:
                if "step" in entry:
                    log_metrics({k: v for k, v in entry.items() if k != "step"}, step=int(entry["step"]))

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                log_metrics(logs, step=state.global_step)

    return MlflowLogger()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}; lists and dicts-in-lists become JSON."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, ensure_ascii=False, default=str)
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- lineage
def git_info(root: str | os.PathLike | None = None) -> dict[str, str]:
    """{"git_commit": sha or "unknown", "git_dirty": "true"/"false"/"unknown"} (tracked files only)."""
    cwd = str(root or project_root())

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def dvc_md5(path: str | os.PathLike, lock: str | os.PathLike = "dvc.lock") -> str:
    """The DVC md5 of `path`: taken from `lock` where the path is a stage output (DVC rewrites the
    lock as each stage finishes, so an upstream output's entry is current), else computed as DVC 3
    does: the plain md5 of a file's bytes; for a directory, the md5 of the JSON list of
    {"md5", "relpath"} of its files sorted by relpath, plus ".dir". Directory hashes match `dvc add`
    when no .dvcignore applies (they are in any case stable). "missing" for a path that is absent."""
    from_lock = _lock_outs(lock).get(_rel(path))
    if from_lock:
        return from_lock
    p = Path(path)
    if p.is_file():
        return _md5_file(p)
    if p.is_dir():
        entries = sorted(
            ({"md5": _md5_file(f), "relpath": f.relative_to(p).as_posix()} for f in p.rglob("*") if f.is_file()),
            key=lambda e: e["relpath"])
        return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"
    return "missing"


def _lock_outs(lock: str | os.PathLike) -> dict[str, str]:
    p = Path(lock)
    if not p.is_file():
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    return {os.path.normpath(out["path"]): out["md5"]
            for stage in (data.get("stages") or {}).values() for out in stage.get("outs") or []
            if isinstance(out, dict) and "path" in out and "md5" in out}


def _md5_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _rel(path: str | os.PathLike) -> str:
    """Path as dvc.lock writes it: relative to the working directory where possible."""
    p = os.fspath(path)
    if os.path.isabs(p):
        with contextlib.suppress(ValueError):
            p = os.path.relpath(p)
    return os.path.normpath(p)


# ----------------------------------------------------------------------------- hygiene
def _key(name: str) -> str:
    """A valid MLflow param/metric/tag key: odd characters become '_'."""
    return _BAD_KEY_CHARS.sub("_", name)


def _dep_key(path: str | os.PathLike) -> str:
    """`dvc.dep.<path>`; MLflow rejects keys that a path normalisation would change, so a '..'
    after the first component (e.g. ../../x) is written as '__'."""
    key = _key("dvc.dep." + _rel(path).replace(os.sep, "/"))
    if posixpath.normpath(key) != key:
        key = re.sub(r"(?<=/)\.\.(?=/|$)", "__", key)
    return key


def secret_values() -> list[str]:
    """Values (6+ characters) of the environment variables that hold secrets, longest first."""
    values = {v for k, v in os.environ.items()
              if (_SECRET_NAME.search(k) or k in _secret_env_names) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def scrub(value: Any) -> Any:
    """`value` with every secret masked as *** (see the module docstring); a non-string comes back
    unchanged unless its text holds a secret, then as the masked text. The one function every string
    passes on its way to MLflow."""
    text = value if isinstance(value, str) else str(value)
    masked = text
    for secret in secret_values():
        masked = masked.replace(secret, "***")
    masked = _SECRET_QUERY.sub(r"\1***", _URL_USERINFO.sub("***", masked))
    return value if masked == text else masked


def scrub_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """`scrub` on every key and value (a key that held a secret is then made a valid MLflow key)."""
    return {(k if scrub(k) == k else _key(scrub(k))): scrub(v) for k, v in values.items()}


@contextlib.contextmanager
def _scrubbed(path: Path) -> Iterator[Path]:
    """`path` itself when none of its text files holds a secret, else a scrubbed copy in a temp dir
    (same names; binary files copied as they are)."""
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        files = [path] if path.is_file() else []

    def dirty(f: Path) -> bool:
        if f.suffix.lower() not in _TEXT_SUFFIXES:
            return False
        text = f.read_text(encoding="utf-8", errors="replace")
        return scrub(text) != text

    if not any(dirty(f) for f in files):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="searchrl-scrub-") as tmp:
        out = Path(tmp) / path.name
        if path.is_dir():
            shutil.copytree(path, out)
            targets = [out / f.relative_to(path) for f in files]
        else:
            shutil.copy2(path, out)
            targets = [out]
        for f in targets:
            if dirty(f):
                f.write_text(scrub(f.read_text(encoding="utf-8", errors="replace")), encoding="utf-8")
        yield out
