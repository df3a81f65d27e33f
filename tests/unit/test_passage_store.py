"""The passage store (searchrl/retrieval/store.py): hits read by row number from the memory-mapped
Arrow file, the same rows as passages.parquet, without loading the corpus; indexes built before the
Arrow file existed still load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from searchrl.retrieval.index import build_index, load_index
from searchrl.retrieval.store import (
    PASSAGE_STORE,
    PASSAGES,
    PassageStore,
    write_passages,
)


def frame(n: int, chars: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"d{i}" for i in range(n)], "title": [f"Title {i}" for i in range(n)],
                         "text": [f"passage {i} " + "x" * chars for i in range(n)], "source": "t"})


def test_rows_come_back_by_row_number_across_record_batches(tmp_path):
    df = frame(1000)
    write_passages(df, tmp_path / PASSAGES, tmp_path / PASSAGE_STORE, batch_rows=64)  # 16 record batches
    store = PassageStore(tmp_path, 1000)
    assert len(store) == 1000 and len(store.batches) == 16 and store.path.name == PASSAGE_STORE
    rows = np.array([999, 0, 63, 64, 500, 128])
    got = store.rows(rows)
    assert got == {int(r): (df.id[r], df.title[r], df.text[r]) for r in rows}
    ids = np.array([[64, 3, -1], [999, 64, 0]])
    hits = store.hits(ids, np.array([[0.9, 0.5, -np.inf], [0.7, 0.6, 0.1]], dtype=np.float32))
    assert [[h.id for h in row] for row in hits] == [["d64", "d3"], ["d999", "d64", "d0"]]  # -1 = padding
    assert hits[1][2].title == "Title 0" and hits[0][0].score == pytest.approx(0.9)


def test_write_passages_writes_both_copies_in_row_groups(tmp_path):
    df = frame(300)
    write_passages(df, tmp_path / PASSAGES, tmp_path / PASSAGE_STORE, batch_rows=128)
    import pyarrow.parquet as pq

    assert pd.read_parquet(tmp_path / PASSAGES).equals(df)  # every column, corpus order
    assert pq.ParquetFile(tmp_path / PASSAGES).num_row_groups == 3  # converted 128 rows at a time
    store = PassageStore(tmp_path, 300)
    assert len(store.batches) == 3 and store.rows(np.array([0, 299])) == {0: ("d0", "Title 0", df.text[0]),
                                                                         299: ("d299", "Title 299", df.text[299])}


def test_a_count_that_disagrees_with_the_manifest_is_corruption(tmp_path):
    from searchrl.errors import IndexCorruptedError

    write_passages(frame(10), tmp_path / PASSAGES, tmp_path / PASSAGE_STORE)
    with pytest.raises(IndexCorruptedError, match=r"passages\.arrow: 10 passages where manifest\.json says 11"):
        PassageStore(tmp_path, 11)
    (tmp_path / PASSAGE_STORE).write_bytes(b"not arrow")
    with pytest.raises(IndexCorruptedError, match=r"passages\.arrow: unreadable"):
        PassageStore(tmp_path, 10)


def test_an_index_without_the_arrow_store_still_loads(tmp_path, caplog):
    """Indexes built before passages.arrow existed: the hits come from passages.parquet."""
    passages = [("p1", "Talo Vesk", "Talo Vesk was born in Peru."), ("p2", "Mira Sol", "Mira Sol works for Bantex.")]
    from searchrl.config import IndexCfg
    from searchrl.data.schema import Passage

    out = tmp_path / "bm25"
    build_index([Passage(i, t, x, "t") for i, t, x in passages], IndexCfg(kind="bm25"), out, progress=False)
    new = load_index(out).search(["Talo Vesk born"], 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert PASSAGE_STORE in manifest["files"]
    del manifest["files"][PASSAGE_STORE]  # as an older build wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / PASSAGE_STORE).unlink()
    old = load_index(out)
    assert old.store.path.name == PASSAGES and old.search(["Talo Vesk born"], 1) == new
    assert "read into memory whole" in caplog.text


MEASURE = textwrap.dedent("""
    import json, sys, psutil, numpy as np
    from pathlib import Path
    from searchrl.retrieval.store import PassageStore
    import pyarrow.parquet as pq
    d, n, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    proc = psutil.Process()
    before = proc.memory_info().rss
    if how == "arrow":
        store = PassageStore(d, n)
        hits = store.hits(np.array([[0, n // 2, n - 1]]), np.zeros((1, 3), dtype=np.float32))
        assert [h.id for h in hits[0]] == ["d0", f"d{n // 2}", f"d{n - 1}"]
    else:  # what the store did before: passages.parquet decoded whole
        table = pq.read_table(d / "passages.parquet", columns=["id", "title", "text"], memory_map=True)
    print(json.dumps({"rss_mb": (proc.memory_info().rss - before) / 2**20}))
""")


@pytest.mark.slow
def test_opening_a_large_store_does_not_load_the_corpus(tmp_path):
    n = 60_000
    df = frame(n, chars=2000)  # ~120 MB of text
    write_passages(df, tmp_path / PASSAGES, tmp_path / PASSAGE_STORE)
    size_mb = (tmp_path / PASSAGE_STORE).stat().st_size / 2**20
    del df

    def rss(how: str) -> float:
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), str(n), how], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]

    arrow, parquet = rss("arrow"), rss("parquet")
    assert size_mb > 100
    assert arrow < 0.1 * size_mb, (arrow, size_mb)  # footer + the three hits' pages
    assert parquet > 0.5 * size_mb, (parquet, size_mb)  # the old way: the whole corpus in memory
