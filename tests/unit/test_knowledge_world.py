from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict

import pytest

from searchrl.config import KnowledgeWorldCfg
from searchrl.data import knowledge_world as kw
from searchrl.errors import ConfigError

COUNTRY_NAMES = {c.name for c in kw.COUNTRIES}


def cfg(**kwargs) -> KnowledgeWorldCfg:
    probe = {"enabled": False, **kwargs.pop("probe", {})}
    return KnowledgeWorldCfg(probe=probe, **kwargs)


def qtype_counts(records) -> Counter:
    return Counter(r.metadata["qtype"] for r in records)


def fictional(record) -> set[str]:
    return {e for e in record.metadata["entities"] if e not in COUNTRY_NAMES}


def all_records(data):
    return data.train + data.eval + data.seen


def mention(c: kw.Country) -> str:
    return f"the {c.name}" if c.name in kw.ARTICLE_COUNTRIES else c.name


def capital_only_oracle(calls: list | None = None):
    """A fake policy that knows every capital and nothing else."""
    capitals = {f"What is the capital of {mention(c)}?": c.capital[0] for c in kw.COUNTRIES}

    def answer_fn(questions: list[str]) -> list[str]:
        if calls is not None:
            calls.append(list(questions))
        return [f"It is {capitals[q]}." if q in capitals else "I do not know" for q in questions]

    return answer_fn


# ----------------------------------------------------------------------------- determinism, sizes
def test_same_seed_gives_identical_world_and_records():
    a, b = kw.generate(cfg(), seed=3), kw.generate(cfg(), seed=3)
    assert [asdict(r) for r in all_records(a)] == [asdict(r) for r in all_records(b)]
    assert [asdict(p) for p in a.world.passages] == [asdict(p) for p in b.world.passages]
    c = kw.generate(cfg(), seed=4)
    assert [r.question for r in c.train] != [r.question for r in a.train]


@pytest.mark.parametrize("sizes", [
    {},  # params.yaml defaults
    {"n_people": 12, "n_companies": 6, "n_works": 6, "n_countries": 10, "n_train": 24, "n_eval": 16, "n_seen": 8},
])
def test_sizes_are_honoured(sizes):
    c = cfg(**sizes)
    data = kw.generate(c, seed=0)
    assert (len(data.train), len(data.eval), len(data.seen)) == (c.n_train, c.n_eval, c.n_seen)
    kinds = [e.kind for e in data.world.entities.values()]
    n_countries = c.n_countries or len(kw.COUNTRIES)
    assert kinds.count("person") == c.n_people and kinds.count("company") == c.n_companies
    assert kinds.count("work") == c.n_works and kinds.count("country") == n_countries
    n_fictional = c.n_people + c.n_companies + c.n_works
    assert len(data.world.passages) == n_fictional + n_countries + n_fictional // 2  # + distractors
    assert {r.split for r in data.train} == {"train"} and {r.split for r in data.seen} == {"seen"}
    ids = [r.id for r in all_records(data)]
    assert len(ids) == len(set(ids))


def test_question_mix_is_balanced_and_every_type_present():
    data = kw.generate(cfg(), seed=0)
    counts = qtype_counts(data.train)
    assert set(counts) == set(kw.QTYPES)
    assert all(v == 40 for v in counts.values())  # 240 over six equal weights


def test_question_mix_weights_and_errors():
    only = kw.generate(cfg(question_mix={"comparison": 1.0, "real_1hop": 0.0}, n_train=20, n_eval=10, n_seen=5), 0)
    assert {r.metadata["qtype"] for r in only.train + only.eval} == {"comparison"}
    with pytest.raises(ConfigError, match="unknown question type.*bridge"):
        kw.generate(cfg(question_mix={"bridge": 1.0}), 0)
    with pytest.raises(ConfigError, match="every weight is 0"):
        kw.generate(cfg(question_mix={"comparison": 0.0}), 0)


def test_exhausted_type_moves_its_share_and_impossible_size_is_a_clear_error():
    # two train companies + two train works: 4 distinct comparisons (earlier / later), quota is 10
    small = dict(n_people=6, n_companies=3, n_works=3, n_countries=4, n_train=60, n_eval=10, n_seen=5)
    data = kw.generate(cfg(**small), seed=1)
    assert len(data.train) == 60
    assert qtype_counts(data.train)["comparison"] == 4
    with pytest.raises(ConfigError, match="could only build .* train questions"):
        kw.generate(cfg(**{**small, "n_train": 5000}), seed=1)


# ----------------------------------------------------------------------------- structure
def test_eval_is_entity_disjoint_from_train():
    data = kw.generate(cfg(), seed=0)
    train_entities = set().union(*(fictional(r) for r in data.train))
    eval_entities = set().union(*(fictional(r) for r in data.eval))
    assert train_entities and eval_entities
    assert not train_entities & eval_entities
    # ... and the eval share follows eval_entity_fraction (0.3 of each kind, by pool)
    people = [e for e in data.world.entities.values() if e.kind == "person"]
    assert sum(e.pool == "eval" for e in people) == round(0.3 * len(people))
    # real 1-hop questions: no country is asked about in both splits
    real = {s: {r.metadata["hops"][0]["subject"] for r in recs if r.metadata["qtype"] == "real_1hop"}
            for s, recs in (("train", data.train), ("eval", data.eval))}
    assert not real["train"] & real["eval"]
    assert not {r.question for r in data.train} & {r.question for r in data.eval}


def test_names_are_unique_and_never_share_a_word():
    world = kw.build_world(cfg(), seed=0)
    names = [e.name for e in world.entities.values() if e.kind != "country"]
    assert len(names) == len(set(names))
    stems = [w for e in world.entities.values() if e.kind in ("person", "company")
             for w in e.name.split()[: 2 if e.kind == "person" else 1]]
    assert len(stems) == len(set(stems))
    assert not {s.lower() for s in stems} & {w.lower() for n in COUNTRY_NAMES for w in n.split()}


def test_every_gold_passage_exists_and_states_its_hop():
    data = kw.generate(cfg(), seed=0)
    corpus = {p.id: p for p in data.world.passages}
    assert len(corpus) == len(data.world.passages)
    for r in all_records(data):
        meta = r.metadata
        assert meta["gold_passage_ids"] and set(meta["gold_passage_ids"]) <= set(corpus)
        assert len(meta["hops"]) == len(meta["fact_ids"]) >= 1
        for hop in meta["hops"]:
            passage = corpus[hop["passage_id"]]
            assert hop["object"] in passage.text, (r.question, hop)
            assert hop["subject"] in passage.text
        assert meta["optimal_retrievals"] == sum(h["source"] == "external" for h in meta["hops"])


def test_hop_counts_and_answers_per_type():
    data = kw.generate(cfg(), seed=0)
    expected_hops = {"real_1hop": 1, "fictional_1hop": 1, "bridge_fictional_real": 2, "fictional_2hop": 2,
                     "comparison": 2, "mixed_3hop": 3}
    for r in data.train + data.eval:
        meta = r.metadata
        assert len(meta["hops"]) == expected_hops[meta["qtype"]]
        if meta["qtype"] == "comparison":
            (a, b) = meta["hops"]
            earlier = a if int(a["object"]) < int(b["object"]) else b
            later = b if earlier is a else a
            want = earlier if ("earlier" in r.question or "first" in r.question) else later
            assert r.answers[0] == want["subject"]
        else:
            assert r.answers[0] == meta["hops"][-1]["object"]
            for prev, nxt in zip(meta["hops"], meta["hops"][1:], strict=False):
                assert prev["object"] == nxt["subject"]  # a chain: each hop's object is the next subject


def test_answers_carry_aliases():
    data = kw.generate(cfg(), seed=0)
    us = [r for r in all_records(data) if r.answers[0] == "United States"]
    usd = [r for r in all_records(data) if r.answers[0] == "US dollar"]
    assert all("USA" in r.answers for r in us)
    assert all("dollar" in r.answers for r in usd)


# ----------------------------------------------------------------------------- seen facts
def test_seen_asks_external_training_facts_in_new_wording():
    data = kw.generate(cfg(), seed=0)
    train_by_id = {r.id: r for r in data.train}
    external = {h["fact_id"] for r in data.train for h in r.metadata["hops"] if h["source"] == "external"}
    train_texts = {r.question for r in data.train}
    one_hop_wording = {(r.metadata["fact_ids"][0], r.question) for r in data.train if len(r.metadata["hops"]) == 1}
    assert len(data.seen) == 60
    for r in data.seen:
        (hop,) = r.metadata["hops"]
        assert hop["fact_id"] in external
        assert r.question not in train_texts
        assert all(f != hop["fact_id"] or q != r.question for f, q in one_hop_wording)
        assert r.metadata["seen_from"]
        for tid in r.metadata["seen_from"]:
            assert hop["fact_id"] in train_by_id[tid].metadata["fact_ids"]
    assert len({r.metadata["fact_ids"][0] for r in data.seen}) == len(data.seen)


# ----------------------------------------------------------------------------- probe
def test_probe_disabled_means_every_hop_external():
    data = kw.generate(cfg(), seed=0)
    assert data.probe is None
    assert all(h["source"] == "external" for r in all_records(data) for h in r.metadata["hops"])


def test_probe_enabled_without_a_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="probe.enabled"):
        kw.generate(cfg(probe={"enabled": True, "cache_path": ""}), seed=0)


def test_probe_flips_known_real_hops_to_internal(tmp_path):
    c = cfg(probe={"enabled": True, "cache_path": str(tmp_path / "probe.json")})
    data = kw.generate(c, seed=0, answer_fn=capital_only_oracle(), model_name="fake")
    assert data.probe.known_rate == pytest.approx(0.25)  # capitals only: 1 of 4 relations
    n_internal = 0
    for r in all_records(data):
        for hop in r.metadata["hops"]:
            if hop["relation"] == "capital":
                assert hop["source"] == "internal"
                n_internal += 1
            else:
                assert hop["source"] == "external"
        assert r.metadata["optimal_retrievals"] == sum(h["source"] == "external" for h in r.metadata["hops"])
    assert n_internal > 0
    capital_1hop = [r for r in data.train if r.metadata["qtype"] == "real_1hop"
                    and r.metadata["hops"][0]["relation"] == "capital"]
    assert capital_1hop and all(r.metadata["optimal_retrievals"] == 0 for r in capital_1hop)
    # seen facts never ask what the policy already knew
    assert all(r.metadata["hops"][0]["relation"] != "capital" for r in data.seen)
    # the questions themselves do not depend on the probe
    plain = kw.generate(cfg(), seed=0)
    assert [r.question for r in plain.train] == [r.question for r in data.train]


def test_probe_scores_with_cover_em_and_caches_answers(tmp_path):
    items = [kw.ProbeItem("country-japan:capital", "What is the capital of Japan?", ["Tokyo"]),
             kw.ProbeItem("country-japan:currency", "What is the currency of Japan?", ["yen", "Japanese yen"]),
             kw.ProbeItem("country-peru:capital", "What is the capital of Peru?", ["Lima"])]
    calls = []

    replies = {"What is the capital of Japan?": "The capital is Tokyo.",
               "What is the currency of Japan?": "the Japanese yen", "What is the capital of Peru?": "Cusco"}

    def answer_fn(questions):
        calls.append(questions)
        return [replies[q] for q in questions]

    path = tmp_path / "cache" / "probe.json"
    first = kw.probe(items, answer_fn, path, model_name="m1", prompt_key="p")
    assert first.known == {"country-japan:capital": True, "country-japan:currency": True,
                           "country-peru:capital": False}
    assert not first.cached and len(calls) == 1
    again = kw.probe(items, answer_fn, path, model_name="m1", prompt_key="p")
    assert again.cached and again.known == first.known and len(calls) == 1  # no second call
    kw.probe(items, answer_fn, path, model_name="m2", prompt_key="p")  # another policy: asked again
    kw.probe(items, answer_fn, path, model_name="m1", prompt_key="other prompt")
    kw.probe(items[:2], answer_fn, path, model_name="m1", prompt_key="p")  # another fact set
    assert len(calls) == 4
    cache = json.loads(path.read_text())
    assert len(cache["entries"]) == 4
    assert {e["model"] for e in cache["entries"].values()} == {"m1", "m2"}


def test_probe_survives_a_corrupt_cache_and_checks_answer_count(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text("{not json")
    items = [kw.ProbeItem("f", "q?", ["a"])]
    assert kw.probe(items, lambda qs: ["a"], path).known == {"f": True}
    assert json.loads(path.read_text())["version"] == 1
    with pytest.raises(ValueError, match="returned 0 answers for 1"):
        kw.probe(items, lambda qs: [], None)


def test_world_generation_with_probe_uses_one_batched_call(tmp_path):
    calls = []
    c = cfg(probe={"enabled": True, "cache_path": str(tmp_path / "p.json")})
    kw.generate(c, seed=0, answer_fn=capital_only_oracle(calls), model_name="fake")
    assert len(calls) == 1 and len(calls[0]) == 4 * len(kw.COUNTRIES)
    kw.generate(c, seed=0, answer_fn=capital_only_oracle(calls), model_name="fake")
    assert len(calls) == 1  # cached


def test_real_fact_aliases_never_repeat_the_country():
    for c in kw.COUNTRIES:
        names = {a.lower() for a in c.aliases}
        for relation in kw.REAL_RELATIONS:
            values = c.fact(relation)
            assert values and not names & {v.lower() for v in values}, (c.name, relation)
            assert not any(v.isupper() and len(v) == 3 for v in values), (c.name, relation)  # no ISO codes
