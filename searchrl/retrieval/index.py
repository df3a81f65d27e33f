"""Build and load the retrieval index: dense FAISS (any index_factory string) or BM25 (bm25s).

An index directory (published atomically, so a failed build leaves the previous one in place):

    index.faiss         dense: faiss index, inner-product metric, id i = row i of passages.parquet
    bm25/               bm25: the bm25s files
    passages.parquet    id, title, text, source in corpus order (the portable copy)
    passages.arrow      id, title, text as uncompressed Arrow IPC: what search returns, read by
                        memory-mapped random access (only the pages of the hits are touched)
    manifest.json       encoder + settings, corpus hash, n_passages, sha256 and size of every file,
                        build seconds and passages/s

Dense builds encode in resumable shards. Passages are sorted by token count (longest first), cut
into shards of `shard_size` and encoded one batch per call, so batches carry almost no padding
(sentence-transformers sorts one call's inputs by characters: 1.44 tokens run per real token on real
paragraphs, see `encode_order`). Each finished shard is saved as .npy under `<out_dir>.work/<key>/`,
key = hash of the encoded texts + encoder settings. An interrupted build resumes and skips finished
shards; with `keep_embeddings` a later build with another factory (Flat -> HNSW -> IVF-PQ)
re-encodes nothing. Vectors reach faiss in chunks read from the memory-mapped shards, so the build
never holds the embeddings twice.

`load_index(dir)` checks the files against the manifest (sizes always; sha256 too up to 1 GiB or with
verify="full") and the encoder against the fingerprint it was built with: anything off raises
IndexCorruptedError naming the file and the fix. `Retriever.search(queries, k)` is one encode call and
one faiss search per batch. `manifest_hash` identifies corpus + encoder + index settings (+ nprobe /
efSearch for approximate indexes): the retrieval cache key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from searchrl.data.schema import PASSAGE_COLUMNS, Passage, passage_contents, passage_frame
from searchrl.errors import ConfigError, IndexCorruptedError, InputError
from searchrl.io import atomic_path, quarantine, sha256_file, stable_hash, write_json
from searchrl.retrieval.base import Hit
from searchrl.retrieval.encoder import Encoder, canonical_name, fingerprint
from searchrl.retrieval.store import (
    MANIFEST,
    PASSAGE_STORE,
    PASSAGES,
    PassageStore,
    rebuild_hint,
    write_passages,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FAISS_FILE, BM25_DIR = "index.faiss", "bm25"
SHARD_ORDER = "tokens-desc-v1"  # how passages are ordered into shards (part of the shard cache key)
VERIFY_AUTO_BYTES = 1 << 30  # verify="auto" hashes the files when they total at most this
ADD_CHUNK = 65536  # vectors per faiss.add call
BM25_SETTINGS = {"k1": 1.5, "b": 0.75, "method": "lucene", "stopwords": "en", "lower": True, "stemmer": None}
IDENTITY = ("format_version", "kind", "encoder", "encoder_fingerprint", "dim", "normalize", "max_length",
            "query_instruction", "passage_prefix", "factory", "metric", "train", "bm25", "corpus_hash",
            "n_passages")


# ----------------------------------------------------------------------------- corpus
def read_passages(corpus: str | os.PathLike | pd.DataFrame | list[Passage]) -> pd.DataFrame:
    """The corpus as a frame of PASSAGE_COLUMNS (str), checked: not empty, unique ids."""
    where = "<passages>"
    if isinstance(corpus, pd.DataFrame):
        df = corpus
    elif isinstance(corpus, (str, os.PathLike)):
        where = str(corpus)
        if not Path(corpus).is_file():
            raise InputError(corpus, "corpus file not found", fix="run the prepare stage: dvc repro prepare")
        df = pd.read_parquet(corpus)
    else:
        df = passage_frame(list(corpus))
    missing = [c for c in ("id", "text") if c not in df.columns]
    if missing:
        raise InputError(where, f"corpus lacks column(s) {missing}; expected {PASSAGE_COLUMNS}")
    df = df.reindex(columns=PASSAGE_COLUMNS).fillna("").astype(str).reset_index(drop=True)
    if df.empty:
        raise InputError(where, "the corpus is empty (0 passages): nothing to index",
                         fix="check the prepare stage's corpus sources (prepare.* in params.yaml)")
    dup = df["id"].duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:2]
        raise InputError(where, f"duplicate passage id {df['id'].iat[rows[0]]!r} (rows {rows[0] + 1} and "
                         f"{rows[1] + 1})", field="id", fix="passage ids must be unique")
    return df


def contents(df: pd.DataFrame) -> list[str]:
    """What is encoded / tokenised, as the agent sees it: `searchrl.data.schema.passage_contents`."""
    return [passage_contents(t, x) for t, x in zip(df["title"], df["text"], strict=True)]


def texts_hash(texts: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def corpus_hash(df: pd.DataFrame) -> str:
    import hashlib

    h = hashlib.sha256()
    for pid, title, text in zip(df["id"], df["title"], df["text"], strict=True):
        h.update(f"{pid}\x1f{title}\x1f{text}\x1e".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- faiss helpers
def _faiss_message(err: Exception) -> str:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[-1].split(": ", 1)[-1] if "Error in" in lines[-1] else lines[-1]


def uses_search_params(factory: str) -> bool:
    """Approximate indexes whose results depend on nprobe / efSearch."""
    return any(key in factory.upper() for key in ("IVF", "HNSW", "NSG"))


def search_params(factory: str, nprobe: int, ef_search: int) -> dict:
    return {"nprobe": nprobe, "efSearch": ef_search} if uses_search_params(factory) else {}


def apply_search_params(index, params: dict) -> dict:
    """Set nprobe / efSearch where the index has them; returns what was applied."""
    import faiss

    applied, space = {}, faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
            applied[name] = value
        except RuntimeError:
            pass  # e.g. efSearch on an IVF index
    return applied


def _new_faiss_index(dim: int, factory: str):
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"params.yaml: index.factory {factory!r} is not a faiss index_factory string for "
                          f"dim {dim}: {_faiss_message(err)} (e.g. Flat, HNSW32,Flat, IVF256,PQ16)") from None


# ----------------------------------------------------------------------------- embedding shards
def _shard_ok(path: Path, rows: int, dim: int) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float32


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def encode_order(texts: list[str], encoder: Encoder, cache: Path | None = None) -> np.ndarray:
    """Corpus rows longest first by *token* count (ties by row), cached next to the shards.

    A batch is padded to its longest member. sentence-transformers sorts by characters, a loose proxy
    for tokens (a run of 128 passages of ~600 characters spans 100 to 220 tokens): on the ~55k
    benchmark paragraphs, batches in character order run 1.44 tokens per real token, in token order
    1.002 (bench/results/index_build.json, "padding")."""
    if cache is not None and cache.is_file():
        try:
            order = np.load(cache)
        except (OSError, ValueError) as err:  # a cache is disposable: recount rather than fail the stage
            quarantine(cache, str(err))
        else:
            if len(order) == len(texts) and np.array_equal(np.sort(order), np.arange(len(texts))):
                return order
    t0 = time.perf_counter()
    lengths = encoder.token_lengths(texts)
    order = np.lexsort((np.arange(len(texts)), -lengths))
    log.info("encode: counted the tokens of %d passages in %.1fs (%.1f tokens per passage, %.1f%% truncated at "
             "%d)", len(texts), time.perf_counter() - t0, float(lengths.mean()) if len(lengths) else 0.0,
             100.0 * float((lengths >= encoder.max_length).mean()) if len(lengths) else 0.0, encoder.max_length)
    if cache is not None:
        _save_npy_atomic(cache, order)
    return order


def encode_shards(texts: list[str], order: np.ndarray, encoder: Encoder, shard_dir: Path, shard_size: int,
                  batch_size: int, progress: bool = True,
                  on_shard: Callable[[int, np.ndarray], None] | None = None) -> tuple[list[Path], dict]:
    """Encode texts[order] shard by shard into shard_dir, skipping shards already there.

    on_shard(shard, rows) is called after each shard it encodes, with the shard's corpus rows."""
    from tqdm.auto import tqdm

    shard_dir.mkdir(parents=True, exist_ok=True)
    n, dim = len(order), encoder.dim
    n_shards = math.ceil(n / shard_size)
    paths, reused, encoded, seconds = [], 0, 0, 0.0
    # One encode call per batch: the call cannot re-sort across batches (sentence-transformers sorts a
    # call's inputs by characters), so each batch is exactly a run of the token-length order.
    step = batch_size
    with tqdm(total=n, unit="passage", desc="encode", disable=not progress, smoothing=0.1) as bar:
        for s in range(n_shards):
            rows = order[s * shard_size:(s + 1) * shard_size]
            path = shard_dir / f"shard-{s:05d}.npy"
            paths.append(path)
            if _shard_ok(path, len(rows), dim):
                reused += 1
                bar.update(len(rows))
                continue
            t0 = time.perf_counter()
            parts = []
            for a in range(0, len(rows), step):
                parts.append(encoder.encode_passages([texts[i] for i in rows[a:a + step]], batch_size))
                bar.update(min(step, len(rows) - a))
            _save_npy_atomic(path, np.concatenate(parts))
            dt = time.perf_counter() - t0
            seconds += dt
            encoded += len(rows)
            log.info("encode: shard %d/%d, %d passages in %.1fs (%.1f passages/s)", s + 1, n_shards, len(rows),
                     dt, len(rows) / max(dt, 1e-9))
            if on_shard is not None:
                on_shard(s, rows)
    if reused:
        log.info("encode: resumed, %d of %d shards already encoded in %s", reused, n_shards, shard_dir)
    return paths, {"shards": n_shards, "shards_reused": reused, "encoded": encoded, "encode_seconds": seconds}


class ShardReader:
    """Rows of the embedding matrix in corpus order, gathered from memory-mapped shards."""

    def __init__(self, paths: list[Path], order: np.ndarray, shard_size: int, dim: int):
        self.shards = [np.load(p, mmap_mode="r") for p in paths]
        self.shard_size, self.dim = shard_size, dim
        self.pos = np.empty(len(order), dtype=np.int64)  # corpus row -> position in shard order
        self.pos[order] = np.arange(len(order))

    def rows(self, corpus_rows: np.ndarray) -> np.ndarray:
        sid, off = np.divmod(self.pos[corpus_rows], self.shard_size)
        out = np.empty((len(corpus_rows), self.dim), dtype=np.float32)
        if not len(sid):
            return out
        by = np.argsort(sid, kind="stable")  # group the requested rows by shard
        starts = np.flatnonzero(np.r_[True, sid[by][1:] != sid[by][:-1]])
        for a, b in zip(starts, [*starts[1:], len(by)], strict=True):
            sel = by[a:b]
            out[sel] = self.shards[sid[sel[0]]][off[sel]]
        return out

    def chunks(self, size: int = ADD_CHUNK) -> Iterator[np.ndarray]:
        for a in range(0, len(self.pos), size):
            yield self.rows(np.arange(a, min(a + size, len(self.pos))))


# ----------------------------------------------------------------------------- build
def work_dir_for(cfg, out_dir: Path) -> Path:
    return Path(cfg.work_dir) if cfg.work_dir else out_dir.with_name(out_dir.name + ".work")


def _build_dense(df: pd.DataFrame, chash: str, cfg, out_dir: Path, encoder: Encoder | None, seed: int,
                 progress: bool, on_shard=None) -> tuple[Any, dict, dict]:
    import faiss

    texts = contents(df)
    encoder = encoder or Encoder.from_cfg(cfg)
    settings = encoder.settings()
    wanted = {"encoder": canonical_name(cfg.encoder), "normalize": cfg.normalize,
              "query_instruction": cfg.query_instruction, "passage_prefix": cfg.passage_prefix}
    if any(settings[k] != v for k, v in wanted.items()):
        raise ValueError(f"the encoder passed to build_index ({settings}) does not match the index params {wanted}")
    faiss_index = _new_faiss_index(encoder.dim, cfg.factory)  # a bad factory fails before encoding
    # The shards are keyed by the exact texts encoded (not only the corpus), the encoder settings and
    # the shard layout: anything else gets fresh shards.
    key_fields = {"texts_hash": texts_hash(texts), **settings, "shard_size": cfg.shard_size, "order": SHARD_ORDER}
    shard_dir = work_dir_for(cfg, out_dir) / stable_hash(key_fields)
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json(shard_dir / "key.json", {**key_fields, "corpus_hash": chash, "n_passages": len(df)})
    order = encode_order(texts, encoder, shard_dir / "order.npy")
    paths, stats = encode_shards(texts, order, encoder, shard_dir, cfg.shard_size, cfg.batch_size, progress,
                                 on_shard)
    del texts  # the encoded strings (a second copy of the corpus text): freed before faiss trains and adds
    reader = ShardReader(paths, order, cfg.shard_size, encoder.dim)

    extra: dict = {}
    t0 = time.perf_counter()
    if not faiss_index.is_trained:
        m = min(len(df), cfg.train_sample)
        sample = np.sort(np.random.default_rng(seed).choice(len(df), size=m, replace=False))
        log.info("index: training %s on %d of %d vectors", cfg.factory, m, len(df))
        try:
            faiss_index.train(reader.rows(sample))
        except RuntimeError as err:
            raise ConfigError(
                f"params.yaml: index.factory {cfg.factory!r} cannot be trained on {m} vectors: "
                f"{_faiss_message(err)} (use fewer IVF lists / PQ centroids, or Flat / HNSW32,Flat for a "
                f"corpus this small)") from None
        extra["train"] = {"vectors": m, "seed": seed}
    for chunk in reader.chunks():
        faiss_index.add(chunk)
    stats["faiss_seconds"] = time.perf_counter() - t0
    stats["shard_dir"] = str(shard_dir)
    manifest = {**settings, "factory": cfg.factory, "metric": "inner_product", **extra,
                "nprobe": cfg.nprobe, "ef_search": cfg.ef_search}

    def write(tmp: Path) -> None:
        faiss.write_index(faiss_index, str(tmp / FAISS_FILE))

    return write, manifest, stats


def _bm25_tokenize(texts: list[str], progress: bool = False):
    import bm25s

    return bm25s.tokenize(texts, lower=BM25_SETTINGS["lower"], stopwords=BM25_SETTINGS["stopwords"],
                          return_ids=False, show_progress=progress)


def _build_bm25(df: pd.DataFrame, progress: bool) -> tuple[Any, dict, dict]:
    import bm25s

    t0 = time.perf_counter()
    bm = bm25s.BM25(k1=BM25_SETTINGS["k1"], b=BM25_SETTINGS["b"], method=BM25_SETTINGS["method"])
    bm.index(_bm25_tokenize(contents(df), progress), show_progress=progress)
    stats = {"shards": 0, "shards_reused": 0, "encoded": len(df), "encode_seconds": time.perf_counter() - t0}

    def write(tmp: Path) -> None:
        bm.save(str(tmp / BM25_DIR), show_progress=False)

    return write, {"bm25": dict(BM25_SETTINGS)}, stats


def build_index(corpus: str | os.PathLike | pd.DataFrame | list[Passage], cfg, out_dir: str | os.PathLike, *,
                encoder: Encoder | None = None, seed: int = 0, progress: bool = True,
                on_shard: Callable[[int, np.ndarray], None] | None = None) -> dict:
    """Build the index described by `cfg` (an IndexCfg) over `corpus` into `out_dir`; returns its stats.

    `corpus` is a corpus.parquet path, a frame of PASSAGE_COLUMNS or a list of Passage. `encoder`
    re-uses an already loaded Encoder (its settings must be the ones cfg describes). `on_shard(shard,
    corpus_rows)` runs after each newly encoded shard (progress reporting, benchmarks).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    df = read_passages(corpus)
    chash = corpus_hash(df)
    log.info("index: %s over %d passages (corpus %s) -> %s", cfg.kind if cfg.kind == "bm25" else
             f"{cfg.factory} / {cfg.encoder}", len(df), chash, out_dir)
    if cfg.kind == "bm25":
        write, manifest, stats = _build_bm25(df, progress)
    else:
        write, manifest, stats = _build_dense(df, chash, cfg, out_dir, encoder, seed, progress, on_shard)

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write(tmp)
        write_passages(df, tmp / PASSAGES, tmp / PASSAGE_STORE)
        files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        seconds = time.perf_counter() - t0
        manifest = {"format_version": FORMAT_VERSION, "kind": cfg.kind, **manifest, "corpus_hash": chash,
                    "n_passages": len(df), "files": files, "build_seconds": round(seconds, 3),
                    "passages_per_s": round(len(df) / max(seconds, 1e-9), 2),
                    "encode_seconds": round(stats["encode_seconds"], 3), "encoded": stats["encoded"],
                    "created": datetime.now(UTC).isoformat(timespec="seconds"), "versions": _versions(cfg.kind)}
        manifest["manifest_hash"] = manifest_hash(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    if cfg.kind == "dense":
        _tidy_work_dir(Path(stats["shard_dir"]), keep=cfg.keep_embeddings)
    log.info("index: %d passages%s, %s, built in %.1fs (%.1f passages/s; encoded %d in %.1fs) -> %s",
             len(df), f", dim {manifest['dim']}" if "dim" in manifest else "", manifest.get("factory", "bm25"),
             seconds, len(df) / max(seconds, 1e-9), stats["encoded"], stats["encode_seconds"], out_dir)
    return {"passages": len(df), "dim": manifest.get("dim", 0), "seconds": round(seconds, 3),
            "passages_per_s": manifest["passages_per_s"], "encoded": stats["encoded"],
            "encode_seconds": round(stats["encode_seconds"], 3),
            "encoded_per_s": round(stats["encoded"] / max(stats["encode_seconds"], 1e-9), 2),
            "shards": stats["shards"], "shards_reused": stats["shards_reused"],
            "index_bytes": sum(f["bytes"] for f in files.values()), "manifest_hash": manifest["manifest_hash"]}


def _versions(kind: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (("faiss-cpu", "sentence-transformers", "torch") if kind == "dense" else ("bm25s",)):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _tidy_work_dir(shard_dir: Path, keep: bool) -> None:
    """Keep only the current shards (or none): old corpus / encoder keys would only fill the disk."""
    work = shard_dir.parent
    for d in work.iterdir():  # only our own shard dirs: work_dir may be a shared scratch directory
        if d.is_dir() and (d / "key.json").is_file() and (d != shard_dir or not keep):
            shutil.rmtree(d, ignore_errors=True)
    if not keep and not any(work.iterdir()):
        work.rmdir()


# ----------------------------------------------------------------------------- manifest
def manifest_identity(manifest: dict, nprobe: int | None = None, ef_search: int | None = None) -> dict:
    ident = {k: manifest[k] for k in IDENTITY if k in manifest}
    if manifest.get("kind") == "dense":
        ident["search"] = search_params(manifest["factory"], nprobe or manifest["nprobe"],
                                        ef_search or manifest["ef_search"])
    else:  # BM25 keeps positive scores only: cache entries written before (k rows, zeros too) must not replay
        ident["search"] = {"hits": "score>0"}
    return ident


def manifest_hash(manifest: dict, nprobe: int | None = None, ef_search: int | None = None) -> str:
    """Stable hash of what determines search results: corpus, encoder, index settings, search params."""
    return stable_hash(manifest_identity(manifest, nprobe, ef_search))


def read_manifest(index_dir: str | os.PathLike) -> dict:
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise InputError(index_dir, "index directory not found",
                         fix="build it: dvc repro index (or python -m tasks.index)")
    path = index_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexCorruptedError(f"{path}: missing, so {index_dir} is not a complete index; "
                                  f"{rebuild_hint(index_dir)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexCorruptedError(f"{path}: not valid JSON ({err}); {rebuild_hint(index_dir)}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in ("dense", "bm25"):
        raise IndexCorruptedError(f"{path}: not an index manifest (no kind dense/bm25); {rebuild_hint(index_dir)}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise IndexCorruptedError(f"{path}: format_version {manifest['format_version']} is newer than this "
                                  f"code reads ({FORMAT_VERSION}); update searchrl or {rebuild_hint(index_dir)}")
    return manifest


def index_manifest_hash(index_dir: str | os.PathLike, cfg=None) -> str:
    """The manifest hash `load_index(index_dir, cfg)` would report, without loading anything heavy."""
    manifest = read_manifest(index_dir)
    if cfg is None:
        return manifest_hash(manifest)
    return manifest_hash(manifest, cfg.nprobe, cfg.ef_search)


def verify_files(index_dir: Path, manifest: dict, verify: bool | str = "auto") -> None:
    """Sizes always; sha256 with verify=True/"full", or "auto" when the files total <= 1 GiB."""
    files: dict = manifest.get("files") or {}
    needed = [PASSAGES, FAISS_FILE] if manifest["kind"] == "dense" else [PASSAGES]
    for name in needed:
        if name not in files:
            raise IndexCorruptedError(f"{index_dir / MANIFEST}: does not list {name}; {rebuild_hint(index_dir)}")
    total = sum(int(meta.get("bytes", 0)) for meta in files.values())
    full = verify in (True, "full") or (verify == "auto" and total <= VERIFY_AUTO_BYTES)
    for name, meta in sorted(files.items()):
        path = index_dir / name
        if not path.is_file():
            raise IndexCorruptedError(f"{path}: missing (listed in {MANIFEST}); {rebuild_hint(index_dir)}")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise IndexCorruptedError(f"{path}: {size} bytes where {MANIFEST} says {meta['bytes']} (truncated or "
                                      f"overwritten); {rebuild_hint(index_dir)}")
        if full and sha256_file(path) != meta["sha256"]:
            raise IndexCorruptedError(f"{path}: sha256 differs from {MANIFEST} (the file is corrupted or was "
                                      f"replaced); {rebuild_hint(index_dir)}")


def check_matches_cfg(index_dir: Path, manifest: dict, cfg) -> None:
    """params.yaml changed since the build (a stale index) -> IndexCorruptedError naming the key."""
    want: dict[str, Any] = {"kind": cfg.kind}
    if manifest["kind"] == "dense" and cfg.kind == "dense":
        want |= {"encoder": canonical_name(cfg.encoder), "factory": cfg.factory, "normalize": cfg.normalize,
                 "query_instruction": cfg.query_instruction, "passage_prefix": cfg.passage_prefix}
    for key, value in want.items():
        if manifest.get(key) != value:
            raise IndexCorruptedError(
                f"{index_dir / MANIFEST}: the index was built with index.{key}={manifest.get(key)!r} but params "
                f"say {value!r}; {rebuild_hint(index_dir)}")


# ----------------------------------------------------------------------------- load + search
class _BaseRetriever:
    kind = ""

    def __init__(self, index_dir: Path, manifest: dict, store: PassageStore, manifest_hash: str):
        self.index_dir, self.manifest, self.store, self.manifest_hash = index_dir, manifest, store, manifest_hash

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index_dir}, {len(self)} passages, {self.manifest_hash})"

    def _check(self, queries: list[str], k: int) -> int:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return min(k, len(self.store))


class DenseRetriever(_BaseRetriever):
    kind = "dense"

    def __init__(self, index_dir, manifest, store, manifest_hash, index, encoder: Encoder, search_params: dict):
        super().__init__(index_dir, manifest, store, manifest_hash)
        self.index, self.encoder, self.search_params = index, encoder, search_params

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """One encode call and one faiss search for the whole batch; k hits per query, best first."""
        kk = self._check(queries, k)
        if not queries:
            return []
        scores, ids = self.index.search(self.encoder.encode_queries(list(queries)), kk)
        return self.store.hits(ids, scores)


class BM25Retriever(_BaseRetriever):
    kind = "bm25"

    def __init__(self, index_dir, manifest, store, manifest_hash, bm25):
        super().__init__(index_dir, manifest, store, manifest_hash)
        self.bm25 = bm25

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Up to k hits per query, best first, only passages sharing a term with the query: bm25s
        returns k rows whatever the scores, and a score of 0 (no query term in the passage, or a
        query of stopwords only) is no match, so such a query gets an empty list (the protocol's
        no-results block)."""
        kk = self._check(queries, k)
        if not queries:
            return []
        ids, scores = self.bm25.retrieve(_bm25_tokenize(list(queries)), k=kk, show_progress=False)
        ids = np.where(np.asarray(scores) > 0, np.asarray(ids, dtype=np.int64), -1)  # -1: dropped by hits()
        return self.store.hits(ids, scores)


def load_index(index_dir: str | os.PathLike, cfg=None, *, encoder: Encoder | None = None,
               verify: bool | str = "auto", mmap: bool = True) -> DenseRetriever | BM25Retriever:
    """Open an index directory as a Retriever.

    cfg (an IndexCfg, optional) supplies the search-time settings (nprobe, ef_search, batch_size,
    device) and is checked against the manifest: an index built with other settings is stale.
    Without it the manifest's own values apply. mmap=True memory-maps the faiss file where the index
    type allows it, so a large Flat / HNSW index does not have to fit in RAM twice while loading.
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if cfg is not None:
        check_matches_cfg(index_dir, manifest, cfg)
    verify_files(index_dir, manifest, verify)
    n = int(manifest["n_passages"])
    store = PassageStore(index_dir, n)

    if manifest["kind"] == "bm25":
        import bm25s

        try:
            bm = bm25s.BM25.load(str(index_dir / BM25_DIR), mmap=mmap, show_progress=False)
        except Exception as err:
            raise IndexCorruptedError(f"{index_dir / BM25_DIR}: unreadable ({err}); {rebuild_hint(index_dir)}") from None
        return BM25Retriever(index_dir, manifest, store, manifest_hash(manifest), bm)

    import faiss

    path = index_dir / FAISS_FILE
    try:
        index = None
        if mmap:
            try:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                index = None  # this index type cannot be memory-mapped: read it normally
        index = index if index is not None else faiss.read_index(str(path))
    except RuntimeError as err:
        raise IndexCorruptedError(f"{path}: faiss cannot read it ({_faiss_message(err)}); "
                                  f"{rebuild_hint(index_dir)}") from None
    if index.ntotal != n or index.d != manifest["dim"]:
        raise IndexCorruptedError(f"{path}: {index.ntotal} vectors of dim {index.d} where {MANIFEST} says {n} of "
                                  f"dim {manifest['dim']}; {rebuild_hint(index_dir)}")
    nprobe = cfg.nprobe if cfg is not None else manifest["nprobe"]
    ef_search = cfg.ef_search if cfg is not None else manifest["ef_search"]
    wanted = search_params(manifest["factory"], nprobe, ef_search)
    applied = apply_search_params(index, wanted)

    if encoder is None:
        encoder = Encoder(manifest["encoder"], max_length=manifest["max_length"], normalize=manifest["normalize"],
                          batch_size=cfg.batch_size if cfg is not None else 128,
                          query_instruction=manifest["query_instruction"],
                          passage_prefix=manifest["passage_prefix"],
                          device=getattr(cfg, "device", "auto") if cfg is not None else "auto")
    _check_encoder(index_dir, manifest, encoder)
    log.info("index: loaded %s (%d passages, %s, %s%s)", index_dir, n, manifest["factory"], manifest["encoder"],
             f", {applied}" if applied else "")
    return DenseRetriever(index_dir, manifest, store, manifest_hash(manifest, nprobe, ef_search), index, encoder,
                          applied)


def _check_encoder(index_dir: Path, manifest: dict, encoder: Encoder) -> None:
    got = encoder.settings()
    for key in ("encoder", "encoder_fingerprint", "dim", "max_length", "normalize", "query_instruction",
                "passage_prefix"):
        if got[key] != manifest.get(key):
            what = (f"the encoder files at {encoder.path} changed since the build" if key == "encoder_fingerprint"
                    else f"{key}={got[key]!r} at load but {manifest.get(key)!r} at build")
            raise IndexCorruptedError(f"{index_dir / MANIFEST}: encoder mismatch, {what} (queries would be "
                                      f"embedded differently from the passages); {rebuild_hint(index_dir)}")


__all__ = ["BM25Retriever", "DenseRetriever", "Encoder", "build_index", "fingerprint", "index_manifest_hash",
           "load_index", "manifest_hash", "read_manifest", "read_passages"]
