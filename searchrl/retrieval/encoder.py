"""Dense text encoder (sentence-transformers) for passages and queries.

The model name goes through `searchrl.models.resolve`: the embedded alias `all-minilm-l6-v2` (the
default, offline), a local directory, or a hub id such as `BAAI/bge-large-en-v1.5`. Asymmetric
retrievers need a different text prefix on each side; both come from params.yaml, never from the
model's own prompt table, so the manifest records exactly what was encoded:

| encoder                 | index.query_instruction                                        | index.passage_prefix |
|-------------------------|----------------------------------------------------------------|----------------------|
| all-MiniLM-L6-v2        | ""                                                             | ""                   |
| BAAI/bge-*-en-v1.5      | "Represent this sentence for searching relevant passages: "    | ""                   |
| intfloat/e5-*           | "query: "                                                      | "passage: "          |

`fingerprint` identifies the weights of a local model directory by content (file sizes and the
hashes of the small config/tokenizer files), so an index built on one machine is recognised on
another and a model changed in place is caught at load time.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from searchrl.errors import ModelNotFoundError
from searchrl.models import ALIASES, pick_device, resolve

log = logging.getLogger(__name__)

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "

# (substring of the lower-cased model name, query prefix, passage prefix) the model was trained with.
KNOWN_PREFIXES = [
    ("bge-", BGE_QUERY_INSTRUCTION, ""),
    ("e5-", E5_QUERY_PREFIX, E5_PASSAGE_PREFIX),
]

_SMALL_FILE = 4 << 20  # files below this are hashed; larger ones (weights) are fingerprinted by size


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def fingerprint(path: str) -> str:
    """Content fingerprint of a local model dir (or the hub id itself when it is not local)."""
    root = Path(path)
    if not root.exists():
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix() if root.is_dir() else p.name
        if any(part.startswith(".") for part in Path(rel).parts) or rel.lower().endswith(".md"):
            continue  # .gitattributes, README.md: do not change the embeddings
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size < _SMALL_FILE:
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def warn_missing_prefixes(name: str, query_instruction: str, passage_prefix: str) -> None:
    low = name.lower()
    for key, q, p in KNOWN_PREFIXES:
        if key in low and ((q and not query_instruction) or (p and not passage_prefix)):
            log.warning("encoder %s was trained with query prefix %r and passage prefix %r; "
                        "params index.query_instruction=%r, index.passage_prefix=%r (recall may suffer)",
                        name, q, p, query_instruction, passage_prefix)


class Encoder:
    """A sentence-transformers model plus the settings that define its embeddings."""

    def __init__(self, name: str = "all-minilm-l6-v2", *, max_length: int = 256, normalize: bool = True,
                 batch_size: int = 128, query_instruction: str = "", passage_prefix: str = "",
                 device: str = "auto"):
        self.name = canonical_name(name)
        self.path = resolve(name)  # ModelNotFoundError for a missing local path / embedded package
        from sentence_transformers import SentenceTransformer  # after resolve: a bad path fails fast

        self.normalize, self.batch_size = normalize, batch_size
        self.query_instruction, self.passage_prefix = query_instruction, passage_prefix
        try:
            self.model = SentenceTransformer(self.path, device=pick_device(device))
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelNotFoundError(
                f"cannot load encoder '{name}' ({self.path}): {first} (offline machines need a local dir "
                f"or the embedded alias all-minilm-l6-v2 in index.encoder)") from None
        limit = getattr(self.model.tokenizer, "model_max_length", None)
        if limit and limit < 100_000 and max_length > limit:
            log.warning("index.max_length=%d exceeds what %s supports (%d); using %d", max_length, name, limit,
                        limit)
            max_length = limit
        self.model.max_seq_length = self.max_length = max_length
        self.dim = int(self.model.get_embedding_dimension())
        self.fingerprint = fingerprint(self.path)
        warn_missing_prefixes(self.name, query_instruction, passage_prefix)

    @classmethod
    def from_cfg(cls, cfg) -> Encoder:
        """From an `IndexCfg` (or anything with the same fields)."""
        return cls(cfg.encoder, max_length=cfg.max_length, normalize=cfg.normalize, batch_size=cfg.batch_size,
                   query_instruction=cfg.query_instruction, passage_prefix=cfg.passage_prefix,
                   device=getattr(cfg, "device", "auto"))

    def settings(self) -> dict:
        """What determines the embeddings (goes into the manifest and the shard cache key)."""
        return {"encoder": self.name, "encoder_fingerprint": self.fingerprint, "dim": self.dim,
                "max_length": self.max_length, "normalize": self.normalize,
                "query_instruction": self.query_instruction, "passage_prefix": self.passage_prefix}

    def token_lengths(self, texts: list[str], chunk: int = 4096) -> np.ndarray:
        """Tokens per text as the model sees it (special tokens included, truncated at max_length)."""
        out = np.empty(len(texts), dtype=np.int64)
        tok = self.model.tokenizer
        for a in range(0, len(texts), chunk):
            ids = tok(list(texts[a:a + chunk]), truncation=True, max_length=self.max_length)["input_ids"]
            out[a:a + len(ids)] = [len(x) for x in ids]
        return out

    def _encode(self, texts: list[str], prompt: str, batch_size: int | None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # prompt="" (not None) so a model's own default prompt never applies behind the manifest's back.
        emb = self.model.encode(list(texts), prompt=prompt, batch_size=batch_size or self.batch_size,
                                normalize_embeddings=self.normalize, convert_to_numpy=True,
                                show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def encode_passages(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        return self._encode(texts, self.passage_prefix, batch_size)

    def encode_queries(self, queries: list[str], batch_size: int | None = None) -> np.ndarray:
        return self._encode(queries, self.query_instruction, batch_size)
