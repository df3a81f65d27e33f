"""DVC's run-cache for this project's persistent outputs, in one cache that every workspace shares.

    python -m searchrl.runcache repro <stage>     # `dvc repro <stage>` with the run-cache (flows.pipeline runs it)
    python -m searchrl.runcache <dvc arguments>   # any dvc command, the same way

DVC's run-cache remembers the outputs of every run of a stage under a key made of its command, the
hashes of its dependencies and the values of its params (`<cache>/runs/`); when `dvc repro` meets a
stage whose key it has seen, it checks those outputs out of the cache ("Stage 'x' is cached - skipping
run, checking out outputs") and writes dvc.lock as if the stage had run. DVC leaves stages with
persistent outputs out of it (`persist: true`: a stage may append to such an output, so its content
need not be a function of the key). Every output in dvc.yaml is persistent for another reason (its
header: stages publish atomically, and DVC must not delete the last good outputs before a run), and
every stage rewrites its outputs whole, so for this project they are a function of the key. This
wrapper runs DVC's own command line with DVC's eligibility test (`dvc.stage.cache._can_hash`) asked as
if no output were persistent; nothing else changes: outputs are still kept (not deleted) before a
run, and a stage with an uncached output other than metrics or plots (evaluate's table.md) still has
no run-cache (DVC's own rule).

Shared across workspaces: searchrl.workspace points the cache of every runs/<name>/ workspace at
`shared_cache_dir` (the project's own DVC cache, `.dvc/cache`, unless `dvc cache dir` moved it;
SEARCHRL_DVC_CACHE overrides), so the run-cache entries of the project root's `make run` serve a
`--set rl.lr=...` workspace too: there prepare, index, sample and sft are checked out, not recomputed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def shared_cache_dir(root: Path) -> Path:
    """The DVC cache the workspaces share: SEARCHRL_DVC_CACHE, else the cache dir of the project at
    `root` (its .dvc/config `cache.dir`, default `<root>/.dvc/cache`)."""
    if env := os.environ.get("SEARCHRL_DVC_CACHE"):
        return Path(env).expanduser().resolve()
    if (root / ".dvc" / "config").is_file():
        from dvc.config import Config

        configured = Config(dvc_dir=str(root / ".dvc"))["cache"].get("dir")
        if configured:
            return Path(configured).resolve()
    return (root / ".dvc" / "cache").resolve()


def enable_for_persistent_outputs() -> None:
    """Make DVC's run-cache eligibility test ignore `persist` (this process only)."""
    import dvc.stage.cache as stage_cache

    can_hash = stage_cache._can_hash
    if getattr(can_hash, "ignores_persist", False):
        return

    def can_hash_ignoring_persist(stage) -> bool:
        persist = [out.persist for out in stage.outs]
        try:
            for out in stage.outs:
                out.persist = False
            return can_hash(stage)
        finally:
            for out, flag in zip(stage.outs, persist, strict=True):
                out.persist = flag

    can_hash_ignoring_persist.ignores_persist = True
    stage_cache._can_hash = can_hash_ignoring_persist


def eligible(stage) -> bool:
    """Whether `dvc repro` through this module saves and restores run-cache entries for `stage` (a
    DVC stage whose dependencies exist): DVC's own test, persist aside, and DVC's rule that a stage with
    an uncached output other than a metric or plot saves none."""
    import dvc.stage.cache as stage_cache

    enable_for_persistent_outputs()
    uncached = any(not out.use_cache for out in stage.outs if not (out.is_metric or out.is_plot))
    return stage_cache._can_hash(stage) and not uncached


def main(argv: list[str] | None = None) -> int:
    from dvc.cli import main as dvc_main

    enable_for_persistent_outputs()
    return dvc_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
