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

Secrets: values of environment variables whose names look secret (*KEY*, *TOKEN*, *SECRET*,
*PASSW*, *CREDENTIAL*) are masked as *** wherever they appear in params or tags.

mlflow is imported inside the functions (about 2 s), so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import posixpath
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from searchrl.config import Params, project_root
from searchrl.io import stable_hash

PARENT_ENV = "SEARCHRL_PARENT_RUN_ID"
SHARED_SECTIONS = ("seed", "policy", "agent")
_OFFLINE_ENV = {
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",  # no `pip install --dry-run` when logging models
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")


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


def configure(params: Params) -> str:
    """Point mlflow at the store and experiment of `params`; returns the experiment id."""
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
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

    configure(params)
    nested = mlflow.active_run() is not None
    parent = None if nested else os.environ.get(PARENT_ENV) or None
    run = mlflow.start_run(run_name=run_name, nested=nested, parent_run_id=parent,
                           tags={k: str(v) for k, v in _scrub(tags).items()})
    try:
        mlflow.log_params(_scrub(flat_params))
        yield run
    except BaseException as err:
        mlflow.end_run(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _dump(params: Params, section: str) -> Any:
    value = getattr(params, section, None)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


# ----------------------------------------------------------------------------- logging helpers
def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric entries (nested dicts flattened, bools as 0/1); others are skipped.
    Does nothing outside a run."""
    import mlflow

    if mlflow.active_run() is None:
        return
    numeric = {_key(k): float(v) for k, v in flatten(metrics).items() if isinstance(v, numbers.Number)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log a file, or a directory under its own name. Does nothing outside a run."""
    import mlflow

    if mlflow.active_run() is None:
        return
    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path=artifact_path or p.name)
    else:
        mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_model_dir(path: str | os.PathLike, registered_name: str, alias: str | None = None,
                  artifact_path: str = "model") -> Any:
    """Upload a saved Hugging Face model directory as artifacts of the active run, register it as a
    new version of `registered_name` and point `alias` at it. Returns the ModelVersion.

    No MLflow model flavor is written: consumers load `models:/<name>@<alias>` by downloading the
    directory (`mlflow.artifacts.download_artifacts`) and calling `from_pretrained` on it."""
    import mlflow
    from mlflow import MlflowClient

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model_dir() needs an active run (use it inside stage_run)")
    mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    version = mlflow.register_model(mlflow.get_artifact_uri(artifact_path), registered_name,
                                    tags={"run_id": run.info.run_id})
    if alias:
        MlflowClient().set_registered_model_alias(registered_name, alias, version.version)
    return version


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


def _scrub(values: Mapping[str, Any]) -> dict[str, Any]:
    """Mask any value that contains the value of a secret-looking environment variable."""
    secrets = [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]
    out = {}
    for key, value in values.items():
        text = str(value)
        for secret in secrets:
            text = text.replace(secret, "***")
        out[key] = value if text == str(value) else text
    return out
