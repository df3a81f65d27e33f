"""DVC stage `index`: the retrieval index over the prepared corpus.

Reads <prepare.out_dir>/corpus.parquet; writes <index.out_dir>/ (faiss index or bm25 files,
passages.parquet, manifest.json; published atomically) and reports/index/metrics.json (DVC metrics:
passages, dim, seconds, passages/s, ...); one MLflow run with the same metrics and the manifest.
Embedding shards live in <index.out_dir>.work/ (not a DVC output): an interrupted build resumes
there, and with index.keep_embeddings a new index.factory re-uses them instead of re-encoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

from searchrl import tracking
from searchrl.config import Params
from searchrl.io import write_json
from searchrl.retrieval.index import MANIFEST, build_index
from searchrl.stage import run_stage, stage_args

log = logging.getLogger("searchrl.index")

METRICS = Path("reports/index/metrics.json")


def index(params: Params) -> dict:
    cfg = params.index
    corpus = Path(params.prepare.out_dir) / "corpus.parquet"
    stats = build_index(corpus, cfg, cfg.out_dir, seed=params.seed)
    metrics = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
    write_json(METRICS, metrics)
    tracking.log_metrics(tracking.flatten({"index": metrics}))
    tracking.log_artifact(Path(cfg.out_dir) / MANIFEST)
    return stats


def main(argv: list[str] | None = None) -> None:
    stage_args("tasks.index", __doc__, argv)
    run_stage("index", index, inputs=["data/prepared/corpus.parquet"])


if __name__ == "__main__":
    main()
