"""Workspaces: run the DVC pipeline on a preset / overrides without touching the user's params.yaml.

With no preset and no overrides the workspace is the project root (its params.yaml, dvc.yaml and
dvc.lock). Otherwise `make_workspace` materialises `runs/<preset stem | custom>/` holding

- `params.yaml`: deep-merge(root params.yaml, preset, overrides), validated like any params.yaml;
- `dvc.yaml` and `.dvcignore`: copies of the root ones; pipeline artifacts (data/, models/,
  reports/) are relative paths, i.e. they live inside the workspace;
- links to the project paths the stages depend on but no stage produces (`searchrl`, `tasks`), so a
  code change reruns the right stage here too. Links, not `../../searchrl` paths: DVC applies
  .dvcignore (`__pycache__`) only inside its repository, and a dependency outside it would change
  whenever Python writes bytecode;
- `.dvc/`: its own DVC repository (`dvc init --no-scm`), hence its own dvc.lock; its cache (and with
  it DVC's run-cache) is the one cache all workspaces and the project root share
  (`searchrl.runcache.shared_cache_dir`), so a stage whose command, dependencies and params match a run
  in any workspace is checked out of the cache instead of run (flows.pipeline runs `dvc repro` through
  `python -m searchrl.runcache`).

Why a nested no-SCM repository: `runs/` is git-ignored, and DVC refuses a git-ignored dvc.yaml
inside a git repository ("bad DVC file name 'dvc.yaml' is git-ignored"); a directory with its own
`.dvc/` and no SCM is a separate DVC project, which DVC accepts and which the root project skips
as a sub-repository. Stage commands run with cwd = the workspace; `python -m tasks.<stage>` imports
the project's code (through the links, or the editable install), and inputs outside the pipeline (`../shared/data/...`) resolve
against the project root (`searchrl.config.resolve_input`).

`SEARCHRL_RUNS_DIR` moves the workspaces elsewhere (tests use a temp dir).

Concurrency: creating or refreshing a workspace, and a whole pipeline run in it (flows.pipeline),
hold the workspace's file lock (`workspace_lock`: `runs/.<name>.lock`, or `.dvc/tmp/` of the project
for the root), so two runs of one preset take turns instead of racing on its files and DVC state; the
lock is reentrant within a process and its file is removed on release.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import yaml

from searchrl.config import Params, load_raw, project_root, validate
from searchrl.errors import ConfigError
from searchrl.io import atomic_path
from searchrl.runcache import shared_cache_dir

log = logging.getLogger(__name__)


def runs_dir(root: Path) -> Path:
    return Path(os.environ.get("SEARCHRL_RUNS_DIR") or root / "runs").resolve()


def resolve_preset(preset: str | os.PathLike, root: Path) -> Path:
    """A preset is a YAML path (relative to cwd or to the project root) or a name under configs/."""
    p = Path(preset).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, root / p]
    if p.suffix not in (".yaml", ".yml"):
        candidates.append(root / "configs" / f"{p.name}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = ", ".join(sorted(x.stem for x in (root / "configs").glob("*.yaml")))
    raise ConfigError(f"preset '{preset}': file not found (presets in configs/: {known or 'none'})")


def links_for(deps: set[PurePosixPath], produced: set[PurePosixPath]) -> list[str]:
    """For each dependency no stage produces (code under searchrl/ and tasks/, raw inputs), its
    shortest leading part that holds no pipeline artifact: the project paths a workspace links to."""
    links = set()
    for p in deps:
        if any(p == q or p in q.parents or q in p.parents for q in produced):
            continue  # produced by a stage (or holds / lies in a stage's output)
        for n in range(1, len(p.parts) + 1):
            head = PurePosixPath(*p.parts[:n])
            if not any(head in q.parents for q in produced):
                links.add(head.as_posix())
                break
    return sorted(links)


def project_links(ws: Path) -> list[str]:
    """`links_for` on the stage graph as DVC resolves it in `ws` (templating, foreach, anchors)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(ws)) as repo:
        stages = list(repo.index.stages)
        produced = {PurePosixPath(o.def_path) for s in stages for o in s.outs}
        deps = {PurePosixPath(d.def_path) for s in stages for d in s.deps
                if not isinstance(d, ParamsDependency) and not PurePosixPath(d.def_path).is_absolute()}
    return links_for(deps, produced)


def _sync_links(ws: Path, names: list[str], root: Path) -> None:
    """Make exactly `names` links into the project; drop links into it that the graph no longer needs
    (a stale link would send a stage's outputs into the project)."""
    wanted = {ws / n for n in names}
    for dirpath, dirnames, filenames in os.walk(ws):
        dirnames[:] = [d for d in dirnames if d != ".dvc" or Path(dirpath) != ws]
        for entry in dirnames + filenames:
            path = Path(dirpath) / entry
            if path.is_symlink() and path not in wanted and path.resolve().is_relative_to(root):
                path.unlink()
    for link in sorted(wanted):
        target = root / link.relative_to(ws)
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise ConfigError(f"{link}: expected a link to {target}; move it away and rerun")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=target.is_dir())


def stage_graph(dvc_src: Path, inputs: list[Path]) -> str:
    """The workspace's dvc.yaml: the root graph, plus the prepare stage's raw input files (absolute
    paths, hashed by DVC like any dependency) so an edited input file reruns prepare."""
    text = dvc_src.read_text(encoding="utf-8")
    if not inputs:
        return text
    graph = yaml.safe_load(text)
    deps = graph["stages"]["prepare"].setdefault("deps", [])
    deps.extend(str(p) for p in inputs if str(p) not in deps)
    return ("# Generated by searchrl.workspace from dvc.yaml plus the prepare stage's input files.\n"
            + yaml.safe_dump(graph, sort_keys=False, allow_unicode=True))


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")


def init_dvc_repo(ws: Path) -> None:
    """`dvc init --no-scm` in `ws` (idempotent), analytics and update checks off."""
    if (ws / ".dvc" / "config").exists():
        return
    from dvc.repo import Repo

    repo = Repo.init(str(ws), no_scm=True, force=True)
    with repo.config.edit() as conf:
        conf["core"]["analytics"] = False
        conf["core"]["check_update"] = False
    repo.close()


def share_cache(ws: Path, cache_dir: Path) -> None:
    """Point the workspace's DVC cache (`cache.dir` in its .dvc/config) at `cache_dir`, the cache every
    workspace shares (searchrl.runcache.shared_cache_dir): outputs are stored once, and the run-cache
    entries of any workspace restore a stage with the same command, dependencies and params here."""
    from dvc.config import Config

    config = Config(dvc_dir=str(ws / ".dvc"))
    if config["cache"].get("dir") and Path(config["cache"]["dir"]).resolve() == cache_dir.resolve():
        return
    with config.edit("repo") as conf:
        conf["cache"]["dir"] = str(cache_dir)


class Plan(NamedTuple):
    """What `make_workspace` would write: the directory, the merged params (raw and validated) and a
    label of where they come from."""

    workspace: Path
    raw: dict | None  # None: the project root's own params.yaml
    params: Params
    source: str


def plan_workspace(preset: str | os.PathLike | None = None, overrides: list[str] | None = None,
                   root: Path | None = None) -> Plan:
    """Resolve and validate preset + overrides without writing anything (ConfigError, one line)."""
    root = Path(root or project_root()).resolve()
    overrides = list(overrides or [])
    if not preset and not overrides:
        return Plan(root, None, validate(load_raw(root / "params.yaml"), "params.yaml"), "params.yaml")
    preset_path = resolve_preset(preset, root) if preset else None
    raw = load_raw(root / "params.yaml", preset_path, overrides)
    source = " + ".join(["params.yaml", *([preset_path.name] if preset_path else []),
                         *([f"--set {' '.join(overrides)}"] if overrides else [])])
    ws = runs_dir(root) / (preset_path.stem if preset_path else "custom")
    return Plan(ws, raw, validate(raw, source), source)


@contextlib.contextmanager
def workspace_lock(ws: Path, root: Path | None = None) -> Iterator[None]:
    """Hold the workspace's file lock (reentrant in this process: the flow holds it for a whole run
    and `make_workspace` inside takes it again); while another process holds it, wait, saying so once."""
    from filelock import FileLock, Timeout

    ws, root = Path(ws).resolve(), Path(root or project_root()).resolve()
    path = root / ".dvc" / "tmp" / "searchrl-workspace.lock" if ws == root else ws.with_name(f".{ws.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False, is_singleton=True)
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.warning("workspace %s is in use by another run; waiting for it to finish", ws)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def make_workspace(preset: str | os.PathLike | None = None, overrides: list[str] | None = None,
                   root: Path | None = None) -> Path:
    """The directory to run `dvc repro` in for this preset + overrides (created or refreshed, under
    the workspace lock)."""
    root = Path(root or project_root()).resolve()
    overrides = list(overrides or [])
    if not preset and not overrides:
        return root
    ws, raw, params, source = plan_workspace(preset, overrides, root)
    ws.parent.mkdir(parents=True, exist_ok=True)
    with workspace_lock(ws, root):
        _materialise(ws, raw, params, source, root)
    return ws


def _materialise(ws: Path, raw: dict, params: Params, source: str, root: Path) -> None:
    ws.mkdir(parents=True, exist_ok=True)
    header = (f"# Generated by searchrl.workspace from {source}; edit the preset, not this file.\n")
    _write_if_changed(ws / "params.yaml", header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))

    dvc_src = root / "dvc.yaml"
    if not dvc_src.exists():
        raise ConfigError(f"{dvc_src}: file not found (the stage graph the workspace copies)")
    _write_if_changed(ws / "dvc.yaml", stage_graph(dvc_src, params.prepare.input_files()))
    if (root / ".dvcignore").exists():
        _write_if_changed(ws / ".dvcignore", (root / ".dvcignore").read_text(encoding="utf-8"))
    init_dvc_repo(ws)
    share_cache(ws, shared_cache_dir(root))
    _sync_links(ws, project_links(ws), root)
