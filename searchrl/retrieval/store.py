"""The passages of an index by row number, read from a memory-mapped Arrow file.

An index directory holds its passages twice: passages.parquet (compressed, portable, what DVC and
pandas users read) and passages.arrow, the same id / title / text columns as an uncompressed Arrow
IPC file. Search results are gathered from the Arrow file by row number (faiss / BM25 ids), through a
memory map: opening it reads the footer only, a search touches only the pages of its hits, and those
pages are the kernel's page cache (shared by every process on the machine, dropped under memory
pressure), not process memory. A 21M-passage Wikipedia store (~14 GB of text) therefore costs the
retrieval server almost nothing to open, where decoding passages.parquet would hold it all in RAM.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from searchrl.errors import IndexCorruptedError
from searchrl.retrieval.base import Hit

log = logging.getLogger(__name__)

MANIFEST, PASSAGES = "manifest.json", "passages.parquet"
PASSAGE_STORE = "passages.arrow"
STORE_BATCH = 65536  # rows per Arrow record batch (and parquet row group)
STORE_COLUMNS = ("id", "title", "text")


def rebuild_hint(index_dir: Path) -> str:
    return (f"rebuild it with `dvc repro index` (`dvc repro -f index` if DVC calls it up to date) or restore "
            f"the cached copy with `dvc checkout {index_dir}`")


def write_passages(df: pd.DataFrame, parquet: Path, arrow: Path, batch_rows: int = STORE_BATCH) -> None:
    """The corpus frame as passages.parquet (all its columns) and passages.arrow (id, title, text,
    uncompressed Arrow IPC), converted and written STORE_BATCH rows at a time: never a second copy of
    the whole corpus in memory (pandas' to_parquet would convert all of it to Arrow first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store_schema = pa.schema([(c, pa.string()) for c in STORE_COLUMNS])
    pq_writer = None
    try:
        with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_file(sink, store_schema) as store:
            for a in range(0, max(len(df), 1), batch_rows):
                part = pa.Table.from_pandas(df.iloc[a:a + batch_rows], preserve_index=False)
                if pq_writer is None:
                    pq_writer = pq.ParquetWriter(str(parquet), part.schema)
                pq_writer.write_table(part)
                store.write_batch(pa.record_batch([part.column(c).combine_chunks().cast(pa.string())
                                                   for c in STORE_COLUMNS], schema=store_schema))
    finally:
        if pq_writer is not None:
            pq_writer.close()


class PassageStore:
    """The passages of an index, read by row number without loading the corpus.

    passages.arrow (uncompressed Arrow IPC) is memory-mapped: opening it reads only the file's footer,
    and a search touches only the pages holding its hits, so a Wikipedia-scale store costs page cache,
    not process memory. An index built before the Arrow store existed falls back to passages.parquet,
    which is decoded into memory whole (parquet pages are compressed: no random access)."""

    def __init__(self, index_dir: Path, n_expected: int):
        import pyarrow as pa

        arrow, parquet = index_dir / PASSAGE_STORE, index_dir / PASSAGES
        self.path = arrow if arrow.is_file() else parquet
        try:
            if self.path == arrow:
                self._source = pa.memory_map(str(arrow), "r")
                reader = pa.ipc.open_file(self._source)
                self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]  # zero-copy views
            else:
                import pyarrow.parquet as pq

                log.warning("index: %s has no %s (built by an older searchrl): passages.parquet is read into memory "
                            "whole; rebuild the index for memory-mapped passages", index_dir, PASSAGE_STORE)
                table = pq.read_table(parquet, columns=["id", "title", "text"], memory_map=True)
                self.batches = table.combine_chunks().to_batches()
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError on a damaged file
            raise IndexCorruptedError(f"{self.path}: unreadable ({err}); {rebuild_hint(index_dir)}") from None
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches], dtype=np.int64)
        if self.starts[-1] != n_expected:
            raise IndexCorruptedError(f"{self.path}: {self.starts[-1]} passages where {MANIFEST} says "
                                      f"{n_expected}; {rebuild_hint(index_dir)}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, rows: np.ndarray) -> dict[int, tuple[str, str, str]]:
        """row number -> (id, title, text) for the given (unique, valid) rows: one take() per record
        batch they fall in."""
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out: dict[int, tuple[str, str, str]] = {}
        for b in np.unique(which):
            sel = rows[which == b]
            part = self.batches[b].take(pa.array(sel - self.starts[b])).to_pydict()
            out.update((int(r), (part["id"][j], part["title"][j], part["text"][j])) for j, r in enumerate(sel))
        return out

    def hits(self, ids: np.ndarray, scores: np.ndarray) -> list[list[Hit]]:
        ids = np.asarray(ids, dtype=np.int64)
        by_row = self.rows(np.unique(ids[ids >= 0]))
        return [[Hit(*by_row[int(i)], score=float(s)) for i, s in zip(qi, qs, strict=True) if i >= 0]
                for qi, qs in zip(ids, scores, strict=True)]
