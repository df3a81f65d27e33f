"""Small file helpers shared by every stage: atomic publishing, strict JSONL reading, hashing,
disposable caches.

Stages never write an output in place: they write to a sibling temp path `.NAME.tmp-PID` and
`os.replace` it, so a crash or a failed validation leaves the previous output untouched. A process
killed mid-publish leaves its `.NAME.tmp-PID` (or `.NAME.old-PID`) behind; the next `atomic_path`
on the same NAME removes those whose PID is no longer alive (`sweep_stale`).

Caches (retrieval SQLite, probe answers, token-length orders) are disposable: a damaged one is moved
aside as `NAME.damaged-<UTC time>` with a warning naming it (`quarantine`), and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from searchrl.errors import ConfigError, InputError

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 probes without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def sweep_stale(final: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `final` left by dead processes (a kill
    during `atomic_path`); returns what was removed. Live processes' temp paths are kept."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)$")
    removed = []
    for sibling in final.parent.iterdir():
        m = pattern.match(sibling.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                sibling.unlink()
        log.info("removed %s, left by a process that no longer runs", sibling)
        removed.append(sibling)
    return removed


def file_path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be a cache or store file (None when it can): an existing directory, or a path
    written as one (ending in a slash)."""
    if str(path).endswith(("/", os.sep)) or Path(path).is_dir():
        return f"'{path}' is a directory: name a file in it, e.g. '{Path(path) / 'cache.sqlite'}'"
    return None


def open_sqlite(path: Path, key: str, **connect_kw) -> sqlite3.Connection:
    """`sqlite3.connect(path)` for a cache or store that the config key `key` names; a path that cannot
    be a database file (a directory, an unwritable or missing folder) is one ConfigError naming both."""
    problem = file_path_problem(path)
    try:
        if problem is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, **connect_kw)
            conn.execute("PRAGMA schema_version").fetchone()  # opens the file now, not at first use
            return conn
    except (OSError, sqlite3.OperationalError) as err:
        if isinstance(err, sqlite3.OperationalError) and "unable to open" not in str(err):
            raise
        problem = f"cannot open '{path}' ({err})"
    raise ConfigError(f"{key}: {problem}")


def quarantine(path: str | os.PathLike, reason: str, sidecars: tuple[str, ...] = ()) -> Path:
    """Move a damaged cache file aside to `NAME.damaged-<UTC time>` (with its `sidecars`, e.g.
    SQLite's "-wal" / "-shm", as `NAME<sidecar>.damaged-...`), warn naming both paths, and return
    the new path. The caller then rebuilds the cache from scratch."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    with contextlib.suppress(FileNotFoundError):  # another process may have moved it first
        os.replace(path, aside)
    for suffix in sidecars:
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            os.replace(side, side.with_name(f"{side.name}.damaged-{stamp}"))
    log.warning("cache %s is damaged (%s); moved it to %s and rebuilding it (the moved file can be "
                "deleted)", path, reason, aside.name)
    return aside


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `final`; on success move it into place (file or directory).
    Temp paths of dead processes next to `final` are swept first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    if final.is_dir() and tmp.is_dir():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_text_strict(path: str | os.PathLike) -> str:
    """Read UTF-8 text; a decoding error names the file, line and byte offset."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(path, f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})",
                         row=line, fix="re-encode the file as UTF-8") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-empty line; bad JSON names the file and line."""
    text = read_text_strict(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, f"malformed JSON ({err.msg} at column {err.colno})", row=lineno) from None
        if not isinstance(obj, dict):
            raise InputError(path, f"expected a JSON object, got {type(obj).__name__}", row=lineno)
        yield lineno, obj


def read_json(path: str | os.PathLike) -> Any:
    text = read_text_strict(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, f"malformed JSON ({err.msg} at column {err.colno})", row=err.lineno) from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of dict order (params hashes, cache keys)."""
    return sha256_text(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str))[:16]
