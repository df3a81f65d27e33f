"""Index build / load / search on a tiny corpus (the real embedded MiniLM for dense, marked slow)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from searchrl.config import IndexCfg, validate
from searchrl.data.schema import Passage
from searchrl.errors import ConfigError, IndexCorruptedError, InputError, ModelNotFoundError
from searchrl.retrieval import index as ix
from searchrl.retrieval.index import (
    build_index,
    index_manifest_hash,
    load_index,
    manifest_hash,
    read_manifest,
)

FACTS = [
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."),
    ("Photosynthesis", "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("Mount Everest", "Mount Everest is the highest mountain on Earth, on the border of Nepal and China."),
    ("Python", "Python is a programming language created by Guido van Rossum and released in 1991."),
    ("Honey bee", "Honey bees live in colonies with a queen and collect nectar from flowers to make honey."),
    ("Great Wall", "The Great Wall of China is a series of fortifications built along northern China."),
    ("Jupiter", "Jupiter is the largest planet in the Solar System, a gas giant with a great red spot."),
    ("Mozart", "Wolfgang Amadeus Mozart was a prolific composer of the Classical period born in Salzburg."),
    ("Amazon River", "The Amazon River in South America carries more water than any other river."),
    ("Penicillin", "Penicillin, discovered by Alexander Fleming in 1928, was the first widely used antibiotic."),
    ("Chess", "Chess is a board game for two players, each starting with sixteen pieces on a checkered board."),
    ("Volcano", "A volcano is a rupture in the crust where lava, ash and gases escape from below the surface."),
    ("Sushi", "Sushi is a Japanese dish of vinegared rice served with raw fish, seaweed and vegetables."),
    ("Bitcoin", "Bitcoin is a decentralised digital currency introduced in 2009 by Satoshi Nakamoto."),
    ("Olympic Games", "The modern Olympic Games are an international sports event held every four years."),
    ("DNA", "DNA is the molecule that carries the genetic instructions of all known living organisms."),
    ("Shakespeare", "William Shakespeare was an English playwright who wrote Hamlet and Romeo and Juliet."),
    ("Coffee", "Coffee is a brewed drink made from roasted coffee beans, the seeds of Coffea berries."),
    ("Antarctica", "Antarctica is the coldest continent, almost entirely covered by a thick ice sheet."),
    ("Violin", "The violin is a wooden string instrument played with a bow, the smallest of its family."),
    ("Tsunami", "A tsunami is a series of huge ocean waves usually caused by an undersea earthquake."),
    ("Leonardo da Vinci", "Leonardo da Vinci was an Italian Renaissance painter who painted the Mona Lisa."),
    ("Moon landing", "Apollo 11 landed the first humans on the Moon in July 1969, Neil Armstrong stepped out first."),
    ("Marathon", "A marathon is a long-distance running race of 42.195 kilometres."),
]
QUERIES = {  # paraphrases: no title words, so dense retrieval has to match meaning
    "Who discovered the first antibiotic drug?": "p09",
    "What is the tallest peak in the world?": "p02",
    "Which planet is the biggest in our solar system?": "p06",
    "When did astronauts first walk on the lunar surface?": "p22",
    "How do green plants make food from light?": "p01",
}


def passages() -> list[Passage]:
    return [Passage(f"p{i:02d}", t, x, "test") for i, (t, x) in enumerate(FACTS)]


def cfg(**kw) -> IndexCfg:
    return IndexCfg(**{"batch_size": 8, "shard_size": 8, **kw})


class CountingEncoder:
    """The real encoder, counting the passages it is asked to encode."""

    def __init__(self, enc):
        self.enc, self.encoded, self.fail_after = enc, 0, None

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode_passages(self, texts, batch_size=None):
        if self.fail_after is not None and self.encoded >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.encoded += len(texts)
        return self.enc.encode_passages(texts, batch_size)


@pytest.fixture(scope="module")
def encoder():
    from searchrl.retrieval.encoder import Encoder

    return Encoder("all-minilm-l6-v2", batch_size=8)


@pytest.fixture(scope="module")
def flat_index(encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("flat") / "index"
    stats = build_index(passages(), cfg(), out, encoder=encoder, progress=False)
    return out, stats


# ----------------------------------------------------------------------------- dense search
@pytest.mark.slow
def test_flat_returns_the_matching_passage_first(flat_index, encoder):
    out, _ = flat_index
    r = load_index(out, cfg(), encoder=encoder)
    results = r.search(list(QUERIES), k=3)
    assert [hits[0].id for hits in results] == list(QUERIES.values())
    for hits in results:
        assert len(hits) == 3
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    top = results[0][0]
    assert (top.title, top.text) == FACTS[9]


@pytest.mark.slow
def test_batched_search_equals_one_query_at_a_time(flat_index, encoder):
    r = load_index(flat_index[0], encoder=encoder)
    batched = r.search(list(QUERIES), k=4)
    single = [r.search([q], k=4)[0] for q in QUERIES]
    assert [[h.id for h in hs] for hs in batched] == [[h.id for h in hs] for hs in single]
    np.testing.assert_allclose([[h.score for h in hs] for hs in batched],
                               [[h.score for h in hs] for hs in single], atol=1e-5)


@pytest.mark.slow
def test_k_larger_than_corpus_and_empty_batch(flat_index, encoder):
    r = load_index(flat_index[0], encoder=encoder)
    assert len(r.search(["anything"], k=100)[0]) == len(FACTS)
    assert r.search([], k=3) == []
    with pytest.raises(ValueError):
        r.search(["x"], k=0)


@pytest.mark.slow
@pytest.mark.parametrize("factory, param", [("HNSW32,Flat", "efSearch"), ("IVF4,PQ8x4", "nprobe")])
def test_approximate_factories_build_and_return_k_hits(factory, param, encoder, tmp_path):
    c = cfg(factory=factory, nprobe=4, ef_search=32)
    build_index(passages(), c, tmp_path / "index", encoder=encoder, progress=False)
    r = load_index(tmp_path / "index", c, encoder=encoder)
    results = r.search(list(QUERIES), k=5)
    assert all(len(hits) == 5 for hits in results)
    assert param in r.search_params
    assert r.manifest["factory"] == factory
    assert ("train" in r.manifest) == factory.startswith("IVF")
    # search params are part of the cache identity for approximate indexes only
    assert r.manifest_hash != load_index(tmp_path / "index", c.model_copy(update={"nprobe": 2, "ef_search": 16}),
                                         encoder=encoder).manifest_hash


# ----------------------------------------------------------------------------- bm25 (no model)
def test_bm25_returns_the_matching_passage_first(tmp_path):
    stats = build_index(passages(), cfg(kind="bm25"), tmp_path / "bm25", progress=False)
    assert stats["passages"] == len(FACTS)
    r = load_index(tmp_path / "bm25")
    results = r.search(["Alexander Fleming antibiotic", "Guido van Rossum language", "zzzz qqqq"], k=3)
    assert [hits[0].id for hits in results[:2]] == ["p09", "p03"]
    assert r.manifest["kind"] == "bm25" and r.manifest["bm25"]["k1"] == 1.5


def test_bm25_returns_only_matching_passages(tmp_path):
    """Issue 11 item 3: a query with no corpus term, or only stopwords, used to get k passages scored
    0.0 (the same list for every such query), so the protocol's no-results block never appeared."""
    from searchrl.agent.protocols import get_protocol

    build_index(passages(), cfg(kind="bm25"), tmp_path / "bm25", progress=False)
    r = load_index(tmp_path / "bm25")
    fleming, nothing, stopwords, empty = r.search(["Fleming", "zzzz qqqq", "the of and is", ""], k=5)
    assert [h.id for h in fleming] == ["p09"] and fleming[0].score > 0  # one passage has the term: one hit
    assert nothing == [] and stopwords == [] and empty == []
    assert all(h.score > 0 for hits in r.search(["the Great Wall of China"], k=24) for h in hits)
    assert "(no results)" in get_protocol("r1searcher_pp").documents_text(nothing)
    # retrieval-cache entries of the old behaviour (zero scores included) are keyed by the old hash
    from searchrl.io import stable_hash

    assert r.manifest_hash != stable_hash({k: r.manifest[k] for k in ix.IDENTITY if k in r.manifest})


def test_padding_ids_are_never_hits(tmp_path):
    """faiss pads with id -1 when it finds fewer than k vectors (IVF with few probed lists): dropped."""
    build_index(passages(), cfg(kind="bm25"), tmp_path / "bm25", progress=False)
    store = load_index(tmp_path / "bm25").store
    hits = store.hits(np.array([[3, -1, -1], [-1, -1, -1]]), np.array([[0.9, -3.4e38, -3.4e38], [0.0, 0.0, 0.0]]))
    assert [[h.id for h in row] for row in hits] == [["p03"], []]


# ----------------------------------------------------------------------------- manifest
@pytest.mark.slow
def test_manifest_content(flat_index, encoder):
    out, stats = flat_index
    m = read_manifest(out)
    assert m["kind"] == "dense" and m["factory"] == "Flat" and m["metric"] == "inner_product"
    assert m["encoder"] == "all-minilm-l6-v2" and m["dim"] == 384 and m["normalize"] is True
    assert m["query_instruction"] == "" and m["passage_prefix"] == "" and m["max_length"] == 256
    assert m["n_passages"] == len(FACTS) and len(m["corpus_hash"]) == 16
    assert set(m["files"]) == {"index.faiss", "passages.parquet", "passages.arrow"}
    from searchrl.io import sha256_file

    for name, meta in m["files"].items():
        assert sha256_file(out / name) == meta["sha256"] and (out / name).stat().st_size == meta["bytes"]
    assert m["build_seconds"] > 0 and m["passages_per_s"] > 0
    assert m["manifest_hash"] == manifest_hash(m) == index_manifest_hash(out) == stats["manifest_hash"]
    # row i of passages.parquet is faiss id i, in corpus order
    assert pd.read_parquet(out / "passages.parquet")["id"].tolist() == [p.id for p in passages()]
    assert stats["passages"] == len(FACTS) and stats["dim"] == 384 and stats["shards"] == 3


@pytest.mark.slow
def test_manifest_hash_is_stable_and_tracks_identity(encoder, tmp_path):
    a = build_index(passages(), cfg(), tmp_path / "a", encoder=encoder, progress=False)
    b = build_index(passages(), cfg(batch_size=4), tmp_path / "b", encoder=encoder, progress=False)
    changed = passages()
    changed[0] = Passage("p00", "Eiffel Tower", "Changed text.", "test")
    c = build_index(changed, cfg(), tmp_path / "c", encoder=encoder, progress=False)
    assert a["manifest_hash"] == b["manifest_hash"] != c["manifest_hash"]


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_rebuild_reuses_finished_shards(encoder, tmp_path):
    counting = CountingEncoder(encoder)
    out = tmp_path / "index"
    first = build_index(passages(), cfg(), out, encoder=counting, progress=False)
    assert (first["shards"], first["shards_reused"], counting.encoded) == (3, 0, len(FACTS))

    import shutil

    shutil.rmtree(out)  # the final index is gone; the shards are not
    counting.encoded = 0
    second = build_index(passages(), cfg(), out, encoder=counting, progress=False)
    assert (second["shards_reused"], second["encoded"], counting.encoded) == (3, 0, 0)

    # another factory re-uses the same embeddings
    third = build_index(passages(), cfg(factory="HNSW32,Flat"), out, encoder=counting, progress=False)
    assert (third["shards_reused"], counting.encoded) == (3, 0)


@pytest.mark.slow
def test_interrupted_build_resumes_and_keeps_the_previous_index(encoder, tmp_path):
    out = tmp_path / "index"
    build_index(passages()[:8], cfg(), out, encoder=encoder, progress=False)  # a previous, smaller index
    counting = CountingEncoder(encoder)
    counting.fail_after = 16  # two of three shards, then "Ctrl-C"
    with pytest.raises(KeyboardInterrupt):
        build_index(passages(), cfg(), out, encoder=counting, progress=False)
    assert read_manifest(out)["n_passages"] == 8  # atomic publish: the old index is untouched
    counting.fail_after, counting.encoded = None, 0
    stats = build_index(passages(), cfg(), out, encoder=counting, progress=False)
    assert (stats["shards_reused"], counting.encoded) == (2, 8)
    assert read_manifest(out)["n_passages"] == len(FACTS)


@pytest.mark.slow
def test_truncated_shard_is_re_encoded(encoder, tmp_path):
    out = tmp_path / "index"
    stats = build_index(passages(), cfg(), out, encoder=encoder, progress=False)
    shard = sorted(ix.work_dir_for(cfg(), out).glob("*/shard-00001.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    counting = CountingEncoder(encoder)
    again = build_index(passages(), cfg(), out, encoder=counting, progress=False)
    assert (again["shards_reused"], counting.encoded) == (2, 8)
    assert again["manifest_hash"] == stats["manifest_hash"]


@pytest.mark.slow
def test_keep_embeddings_false_removes_the_work_dir(encoder, tmp_path):
    out = tmp_path / "index"
    build_index(passages(), cfg(keep_embeddings=False), out, encoder=encoder, progress=False)
    assert not ix.work_dir_for(cfg(), out).exists()


# ----------------------------------------------------------------------------- errors
def test_empty_corpus_is_a_clear_error(tmp_path):
    path = tmp_path / "corpus.parquet"
    pd.DataFrame(columns=["id", "title", "text", "source"]).to_parquet(path)
    with pytest.raises(InputError, match="corpus is empty"):
        build_index(path, cfg(), tmp_path / "index", progress=False)
    with pytest.raises(InputError, match="corpus is empty"):
        build_index([], cfg(kind="bm25"), tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()


def test_missing_corpus_and_duplicate_ids(tmp_path):
    with pytest.raises(InputError, match="corpus file not found.*dvc repro prepare"):
        build_index(tmp_path / "nope.parquet", cfg(), tmp_path / "index", progress=False)
    dup = passages()[:3] + [Passage("p01", "x", "y")]
    with pytest.raises(InputError, match="duplicate passage id 'p01'"):
        build_index(dup, cfg(kind="bm25"), tmp_path / "index", progress=False)


def test_missing_encoder_path_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="models/no-such-encoder"):
        build_index(passages(), cfg(encoder="models/no-such-encoder"), tmp_path / "index", progress=False)


@pytest.mark.slow
def test_bad_factory_and_untrainable_factory_are_config_errors(encoder, tmp_path):
    # a factory faiss cannot parse fails when params are loaded, before any stage runs
    with pytest.raises(ConfigError, match=r"index.factory: faiss cannot build 'IVF9,Bogus'"):
        validate({"index": {"factory": "IVF9,Bogus"}})
    with pytest.raises(ConfigError, match="cannot be trained on 24 vectors"):
        build_index(passages(), cfg(factory="IVF256,PQ16"), tmp_path / "b", encoder=encoder, progress=False)


def test_missing_index_dir_and_missing_manifest(tmp_path):
    with pytest.raises(InputError, match="index directory not found"):
        load_index(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(IndexCorruptedError, match="manifest.json: missing.*dvc repro index"):
        load_index(tmp_path / "half")


@pytest.fixture
def bm25_dir(tmp_path):
    build_index(passages(), cfg(kind="bm25"), tmp_path / "bm25", progress=False)
    return tmp_path / "bm25"


def test_corrupted_file_raises_index_corrupted(bm25_dir):
    target = bm25_dir / "passages.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptedError, match=r"passages\.parquet: sha256 differs.*dvc repro index"):
        load_index(bm25_dir)


def test_truncated_file_raises_index_corrupted(bm25_dir):
    target = next((bm25_dir / "bm25").glob("data.csc*"))
    target.write_bytes(target.read_bytes()[:10])
    with pytest.raises(IndexCorruptedError, match=r"data\.csc\.index\.npy: \d+ bytes where manifest\.json says"):
        load_index(bm25_dir, verify=False)  # sizes are checked even without hashing


@pytest.mark.slow
def test_corrupted_faiss_file_raises_index_corrupted(flat_index, encoder, tmp_path):
    import shutil

    out = tmp_path / "index"
    shutil.copytree(flat_index[0], out)
    target = out / "index.faiss"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(IndexCorruptedError, match=r"index\.faiss: \d+ bytes where"):
        load_index(out, encoder=encoder)
    # a truncated file whose manifest entry was "fixed" up still fails, in faiss itself
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["index.faiss"]["bytes"] = target.stat().st_size
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexCorruptedError, match=r"index\.faiss: faiss cannot read it"):
        load_index(out, encoder=encoder, verify=False)


@pytest.mark.slow
def test_manifest_mismatch_raises_index_corrupted(flat_index, encoder, tmp_path):
    import shutil

    with pytest.raises(IndexCorruptedError, match=r"index\.factory='Flat' but params say 'HNSW32,Flat'.*dvc repro"):
        load_index(flat_index[0], cfg(factory="HNSW32,Flat"), encoder=encoder)
    out = tmp_path / "index"
    shutil.copytree(flat_index[0], out)
    m = json.loads((out / "manifest.json").read_text())
    m["encoder_fingerprint"] = "0" * 16
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexCorruptedError, match="encoder mismatch"):
        load_index(out, encoder=encoder)


# ----------------------------------------------------------------------------- encoder + stage
@pytest.mark.slow
def test_query_instruction_and_passage_prefix_are_applied(encoder):
    from searchrl.retrieval.encoder import Encoder

    e5ish = Encoder("all-minilm-l6-v2", query_instruction="query: ", passage_prefix="passage: ")
    q = e5ish.encode_queries(["capital of France"])
    p = e5ish.encode_passages(["Paris is the capital of France."])
    np.testing.assert_allclose(q, encoder.encode_queries(["query: capital of France"]), atol=1e-5)
    np.testing.assert_allclose(p, encoder.encode_passages(["passage: Paris is the capital of France."]), atol=1e-5)
    assert e5ish.settings()["query_instruction"] == "query: "
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_index_stage_writes_index_and_metrics(tmp_path, monkeypatch):
    from searchrl.config import Params
    from tasks.index import index as index_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    pd.DataFrame([p.__dict__ for p in passages()]).to_parquet(tmp_path / "data/prepared/corpus.parquet")
    params = Params.model_validate({"index": {"batch_size": 8, "shard_size": 16}})
    index_stage(params)
    metrics = json.loads((tmp_path / "reports/index/metrics.json").read_text())
    assert metrics["passages"] == len(FACTS) and metrics["dim"] == 384 and metrics["passages_per_s"] > 0
    assert read_manifest(tmp_path / "data/index")["n_passages"] == len(FACTS)


# ----------------------------------------------------------------------------- encode order + shard reader
def test_shard_reader_returns_corpus_order(tmp_path):
    rng = np.random.default_rng(0)
    n, size, dim = 300, 64, 8
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    order = rng.permutation(n)
    paths = []
    for s, a in enumerate(range(0, n, size)):
        paths.append(tmp_path / f"shard-{s:05d}.npy")
        np.save(paths[-1], emb[order[a:a + size]])
    reader = ix.ShardReader(paths, order, size, dim)
    assert np.array_equal(np.concatenate(list(reader.chunks(100))), emb)
    picks = rng.choice(n, 50, replace=False)
    assert np.array_equal(reader.rows(picks), emb[picks])
    assert reader.rows(np.array([], dtype=np.int64)).shape == (0, dim)


@pytest.mark.slow
def test_encode_order_is_longest_first_by_tokens_and_cached(encoder, tmp_path):
    texts = [x for _, x in FACTS]
    order = ix.encode_order(texts, encoder, tmp_path / "order.npy")
    lengths = encoder.token_lengths(texts)
    assert sorted(order.tolist()) == list(range(len(texts)))
    assert (np.diff(lengths[order]) <= 0).all()
    assert np.array_equal(np.load(tmp_path / "order.npy"), order)
