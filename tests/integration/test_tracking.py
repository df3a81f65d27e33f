"""MLflow conventions against a real SQLite store in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from searchrl.config import Params
from searchrl.io import stable_hash
from searchrl.tracking import (
    PARENT_ENV,
    dvc_md5,
    flatten,
    log_artifact,
    log_metrics,
    log_model_dir,
    pipeline_run,
    stage_run,
    tracking_uri,
)

SECRET = "sk-test-0123456789abcdef"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A git-committed project root; the stage runs from runs/smoke/ like a DVC preset run."""
    root = tmp_path / "proj"
    (root / "runs" / "smoke").mkdir(parents=True)
    (root / "params.yaml").write_text("seed: 0\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "params.yaml"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=root, check=True)
    monkeypatch.setenv("SEARCHRL_ROOT", str(root))
    # mlflow exports MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID itself: let monkeypatch restore them
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", PARENT_ENV, "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK",
                "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.chdir(root / "runs" / "smoke")
    yield root
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)   # do not leave later tests pointing at this tmp store
    mlflow.tracking.fluent._active_experiment_id = None


def make_params() -> Params:
    p = Params()
    p.tracking.experiment = "test-exp"
    p.sft.lr = 3e-5
    p.sample.teacher_model = f"https://api.example/v1?key={SECRET}"  # must never reach the store
    return p


def client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_relative_sqlite_uri_resolves_against_project_root(project, monkeypatch):
    assert tracking_uri(make_params()) == f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking_uri(make_params()) == "sqlite:///elsewhere.db"   # the environment wins, verbatim


def test_stage_run_logs_params_tags_metrics(project):
    Path("data/prepared").mkdir(parents=True)
    Path("data/prepared/qa.parquet").write_bytes(b"qa-bytes")
    Path("data/sft").mkdir(parents=True)
    Path("data/sft/train.jsonl").write_text('{"text": "x"}\n')
    Path("dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: python -m searchrl.stages.prepare\n    outs:\n"
        "    - path: data/prepared/qa.parquet\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef\n"
        "      size: 8\n")
    params = make_params()
    inputs = ["data/prepared/qa.parquet", "data/sft/train.jsonl", "../../params.yaml", "data/none"]
    with stage_run("sft", params, inputs=inputs) as run:
        log_metrics({"train": {"loss": 0.5}, "eval/f1": 41, "ok": True, "note": "text", "none": None}, step=3)
        log_metrics({"recall@5": 0.9})
        Path("report.json").write_text("{}")
        log_artifact("report.json")
    assert (project / "mlflow.db").exists() and not Path("mlflow.db").exists()

    r = client(project).get_run(run.info.run_id)
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "sft"
    # params: the stage section and the shared sections, flattened; nothing else
    assert r.data.params["sft.lr"] == "3e-05"
    assert r.data.params["sft.out_dir"] == "models/sft"
    assert r.data.params["policy.model"] == "smollm2-135m-instruct"
    assert r.data.params["seed"] == "0"
    assert r.data.params["agent.top_k"] == "3"
    assert not any(k.startswith(("rl.", "index.", "sample.")) for k in r.data.params)
    # tags
    tags = r.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert tags["stage"] == "sft"
    assert tags["git_commit"] == head and tags["git_dirty"] == "false"
    assert tags["params_hash"] == stable_hash(params.sft.model_dump(mode="json"))
    assert tags["dvc.dep.data/prepared/qa.parquet"] == "0123456789abcdef0123456789abcdef"  # from dvc.lock
    assert tags["dvc.dep.data/sft/train.jsonl"] == hashlib.md5(b'{"text": "x"}\n').hexdigest()  # computed
    assert tags["dvc.dep.../__/params.yaml"] == hashlib.md5(b"seed: 0\n").hexdigest()  # '..' kept valid
    assert tags["dvc.dep.data/none"] == "missing"
    # metrics: numeric only, nested flattened, bools as 0/1, bad characters replaced
    assert r.data.metrics == {"train.loss": 0.5, "eval/f1": 41.0, "ok": 1.0, "recall_5": 0.9}
    assert client(project).get_metric_history(run.info.run_id, "train.loss")[0].step == 3
    # artifacts land next to the database, not in the working directory
    assert [a.path for a in client(project).list_artifacts(run.info.run_id)] == ["report.json"]
    assert (project / "mlruns").is_dir() and not Path("mlruns").exists()


def test_params_hash_changes_with_the_stage_section_only(project):
    a, b, c = make_params(), make_params(), make_params()
    b.rl.lr = 1.0      # another section
    c.sft.epochs = 9   # this section
    hashes = []
    for p in (a, b, c):
        with stage_run("sft", p) as run:
            pass
        hashes.append(client(project).get_run(run.info.run_id).data.tags["params_hash"])
    assert hashes[0] == hashes[1] != hashes[2]


def test_dirty_tree_is_flagged(project):
    (project / "params.yaml").write_text("seed: 1\n")
    with stage_run("evaluate", make_params()) as run:
        pass
    assert client(project).get_run(run.info.run_id).data.tags["git_dirty"] == "true"


def test_secrets_never_reach_the_store(project):
    with stage_run("sample", make_params()) as run:
        pass
    r = client(project).get_run(run.info.run_id)
    assert r.data.params["sample.teacher_model"] == "https://api.example/v1?key=***"
    assert r.data.params["sample.teacher_api_key_env"] == "OPENAI_API_KEY"   # the name is fine
    everything = json.dumps([r.data.params, r.data.tags])
    assert SECRET not in everything


def test_failure_marks_run_failed(project):
    with pytest.raises(ZeroDivisionError):
        with stage_run("rl", make_params()) as run:
            raise ZeroDivisionError("boom")
    assert client(project).get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_pipeline_run_and_stage_nested_via_environment(project, monkeypatch):
    params = make_params()
    with pipeline_run(params, name="pipeline-smoke", workspace=project / "runs" / "smoke",
                      tags={"preset": "smoke"}) as parent:
        # what the flow does: the stage is a subprocess (`dvc repro`) that only sees the environment
        monkeypatch.setenv(PARENT_ENV, parent.run_id)
        code = ("from searchrl.config import Params; from searchrl.tracking import stage_run\n"
                "p = Params(); p.tracking.experiment = 'test-exp'\n"
                "with stage_run('index', p) as run: print(run.info.run_id)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        child_id = out.stdout.strip().splitlines()[-1]
    c = client(project)
    p = c.get_run(parent.run_id)
    assert p.info.status == "FINISHED" and p.info.run_name == "pipeline-smoke"
    assert p.data.tags["preset"] == "smoke" and p.data.tags["stage"] == "pipeline"
    assert p.data.tags["workspace"] == str(project / "runs" / "smoke")
    assert p.data.tags["params_hash"] == stable_hash(params.model_dump(mode="json"))
    assert p.data.params["rl.reward.group_clip"] == "2.0" and len(p.data.params) > 100  # all sections
    assert p.data.params["sample.teacher_model"].endswith("key=***")
    child = c.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.data.tags["stage"] == "index"
    assert child.info.experiment_id == parent.experiment_id


def test_nested_under_active_run_in_process(project):
    params = make_params()
    with stage_run("pipeline", params) as parent:
        with stage_run("rl@pp", params) as child:
            log_metrics({"reward": 1.5})
        assert mlflow.active_run().info.run_id == parent.info.run_id
    c = client(project).get_run(child.info.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert c.data.params["rl.lr"] == "2e-06"      # section = stage up to '@'
    assert c.data.metrics == {"reward": 1.5}


def test_registered_model_gets_alias(project):
    model_dir = Path("models/sft")
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "model.safetensors").write_bytes(b"\0" * 64)
    params = make_params()
    with stage_run("sft", params) as run:
        v1 = log_model_dir(model_dir, params.tracking.registered_model, alias="sft")
    with stage_run("rl", params):
        v2 = log_model_dir(model_dir, params.tracking.registered_model, alias="rl")
    c = client(project)
    assert c.get_model_version_by_alias("searchrl-policy", "sft").version == v1.version
    assert c.get_model_version_by_alias("searchrl-policy", "rl").version == v2.version == int(v1.version) + 1
    assert c.get_model_version("searchrl-policy", v1.version).tags["run_id"] == run.info.run_id
    local = mlflow.artifacts.download_artifacts("models:/searchrl-policy@sft", dst_path=str(project / "dl"))
    assert sorted(os.listdir(local)) == ["config.json", "model.safetensors"]


def test_log_model_dir_needs_a_run(project):
    with pytest.raises(RuntimeError, match="active run"):
        log_model_dir(".", "x")


def test_helpers_are_noops_outside_a_run(project):
    log_metrics({"x": 1.0})
    log_artifact("nothing-here")
    assert mlflow.active_run() is None


def test_import_is_light():
    code = "import sys, searchrl.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": None}) == {
        "a.b": 1, "a.c.d": "x", "e": "[1, 2]", "f": None}


def test_dvc_md5_matches_dvc_add(tmp_path, monkeypatch):
    """Files and directories hash exactly as `dvc add` records them."""
    from dvc.repo import Repo

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("beta\r\n")        # CRLF kept: DVC 3 hashes raw bytes
    (tmp_path / "d" / "sub" / "a.txt").write_text("alpha")
    (tmp_path / "f.bin").write_bytes(bytes(range(256)))
    ours = {"d": dvc_md5("d"), "f.bin": dvc_md5("f.bin")}
    repo = Repo.init(str(tmp_path), no_scm=True)
    repo.add(["d", "f.bin"])
    import yaml
    theirs = {name: yaml.safe_load(Path(f"{name}.dvc").read_text())["outs"][0]["md5"] for name in ours}
    assert ours == theirs
    assert ours["d"].endswith(".dir")
    assert dvc_md5("absent") == "missing"


# ----------------------------------------------------------------------------- secrets, everywhere
def test_every_string_sent_to_mlflow_is_scrubbed(project, monkeypatch):
    """Params, tags (the flow's `overrides` tag included), run names, metric keys, texts and artifact
    files: one scrubbing for all, covering a --set value equal to a secret and the variable that
    sample.teacher_api_key_env names (whatever it is called)."""
    from searchrl.tracking import log_params, log_text, set_tags

    monkeypatch.setenv("TEACHER_BEARER", "bearer-0123456789")
    params = make_params()
    params.sample.teacher_api_key_env = "TEACHER_BEARER"
    params.sample.teacher_served_model = SECRET  # `--set sample.teacher_served_model=<the secret>`
    Path("report.json").write_text(json.dumps({"endpoint": f"https://u:pw0rd@api.example/v1?token={SECRET}",
                                               "auth": "bearer-0123456789"}))
    with stage_run("sample", params, run_name=f"sample {SECRET}") as run:
        set_tags({"overrides": f"sample.teacher_served_model={SECRET} evaluate.top_k=3"})
        log_params({"extra": "bearer-0123456789"})
        log_metrics({f"m_{SECRET}": 1.0})
        log_text(f"table with {SECRET}\n", "evaluation.md")
        log_artifact("report.json")
    c = client(project)
    r = c.get_run(run.info.run_id)
    assert r.data.tags["overrides"] == "sample.teacher_served_model=*** evaluate.top_k=3"
    assert r.data.params["sample.teacher_served_model"] == "***"
    assert r.info.run_name == "sample ***"
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(project / "dl")))
    stored = json.dumps([r.data.params, r.data.tags, r.info.run_name, list(r.data.metrics)])
    stored += "".join(p.read_text() for p in local.rglob("*") if p.is_file())
    for secret in (SECRET, "bearer-0123456789", "pw0rd"):
        assert secret not in stored
    assert "https://***@api.example/v1?token=***" in stored
    assert SECRET in Path("report.json").read_text()  # the local file is untouched


# ----------------------------------------------------------------------------- a server that is down
def test_a_tracking_server_that_is_down_fails_fast_naming_it(project, monkeypatch):
    from tests.integration.test_deployment import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = ("from searchrl.config import Params; from searchrl.tracking import stage_run\n"
            "with stage_run('index', Params()): pass\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30  # a health check of a few seconds, not MLflow's ~250 s of retries
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("searchrl.errors.TrackingError: MLflow tracking server " + uri + " is not reachable")


def test_a_tracking_server_that_fails_after_its_health_check_is_one_line_not_a_hang(project, monkeypatch):
    """/health answers 200, every API call 503: the stage hung in MLflow's retry backoff (7 retries,
    factor 2, 120 s timeouts) past two minutes; now it gives up in seconds with one line naming the URI."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self):
            self.send_response(200 if self.path.rstrip("/").endswith("/health") else 503)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_POST = do_PATCH = reply

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    Path("params.yaml").write_text("seed: 0\n")
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-c", "from searchrl.stage import run_stage\n"
                              "run_stage('index', lambda params: None)\n"], capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert time.monotonic() - t0 < 60
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().startswith(f"index: error: MLflow tracking at {uri} failed: ")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_two_stages_creating_a_fresh_sqlite_store_at_once_both_succeed(project, tmp_path):
    """Two presets' stages touching a new mlflow.db at the same moment raced in alembic's migrations
    (`duplicate column name: step`, 2 of 2 tries); the store's creation is now under a file lock."""
    db = tmp_path / "fresh" / "mlflow.db"
    code = ("import sys; from searchrl.config import Params; from searchrl.tracking import stage_run\n"
            "p = Params(); p.tracking.uri = sys.argv[1]\n"
            "with stage_run(sys.argv[2], p): pass\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}", stage], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for stage in ("prepare", "index", "sample")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0, 0], [err[-1500:] for _, err in results]
    runs = MlflowClient(f"sqlite:///{db}").search_runs([e.experiment_id for e in
                                                        MlflowClient(f"sqlite:///{db}").search_experiments()])
    assert sorted(r.data.tags["stage"] for r in runs) == ["index", "prepare", "sample"]


# ----------------------------------------------------------------------------- killed runs
KILLED_STAGE = """
import os, signal, sys
from searchrl.config import Params
from searchrl.tracking import log_metrics, stage_run
p = Params(); p.tracking.experiment = "test-exp"; p.sft.lr = float(sys.argv[1])
with stage_run("sft", p) as run:
    print(run.info.run_id, flush=True)
    for step in (1, 2, 3):
        log_metrics({"loss": 1.0 / step}, step=step)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # "live": stays RUNNING until the test closes stdin
"""


def start_stage(lr: float, mode: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(lr), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_killed_stage_is_resumed_in_one_run_and_other_orphans_are_closed(project):
    killed, killed_id = start_stage(2e-5, "die")            # the run the rerun continues
    other, other_id = start_stage(9e-5, "die")               # an orphan with other params
    live, live_id = start_stage(7e-5, "live")                # a run of a process still running
    assert killed.wait(60) == -9 and other.wait(60) == -9
    c = client(project)
    assert c.get_run(killed_id).info.status == "RUNNING"  # what a kill leaves

    params = make_params()
    params.sft.lr = 2e-5
    with stage_run("sft", params) as run:
        for step in (1, 2, 3, 4, 5):  # a trainer replaying its checkpointed history, then going on
            log_metrics({"loss": 1.0 / step}, step=step)
    try:
        assert run.info.run_id == killed_id
        r = c.get_run(killed_id)
        assert r.info.status == "FINISHED" and r.data.tags["searchrl.pid"] == str(os.getpid())
        assert [(m.step, m.value) for m in c.get_metric_history(killed_id, "loss")] == [
            (s, 1.0 / s) for s in (1, 2, 3, 4, 5)]  # one history, no step twice
        assert c.get_run(other_id).info.status == "KILLED"
        assert c.get_run(live_id).info.status == "RUNNING"  # its process still runs: not an orphan
    finally:
        live.communicate("", timeout=60)
    assert c.get_run(live_id).info.status == "FINISHED"
