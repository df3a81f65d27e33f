"""Rejection sampling: the filters on good and bad trajectories, the oracle on a tiny Knowledge World
with a real (BM25) index, the evidence oracle on real HotpotQA / MuSiQue rows, the start-up check of
the oracle's data, selection, difficulty labels, and the HTTP teacher against a local server."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from searchrl.agent.backends import added_tokens
from searchrl.agent.engine import run_rollouts
from searchrl.agent.fakes import KeywordRetriever, ScriptedBackend
from searchrl.agent.protocols import get_protocol
from searchrl.agent.trajectory import Segment
from searchrl.config import AgentCfg, IndexCfg, KnowledgeWorldCfg
from searchrl.data import knowledge_world as kw
from searchrl.errors import ConfigError
from searchrl.models import load_tokenizer
from searchrl.training import sampling
from searchrl.training.teacher import ChatPromptParser, OpenAIBackend, TeacherError

PP = get_protocol("r1searcher_pp")
AGENT = AgentCfg(max_total_tokens=512, max_segment_tokens=128, top_k=2)
PASSAGES = [("p-fr", "France", "France is a country in Europe. Its capital city is Paris."),
            ("p-de", "Germany", "Germany is a country in Europe. Its capital city is Berlin."),
            ("p-zo", "Zorblat Holdings", "Zorblat Holdings was founded in 1901 in France.")]
Q = "What is the capital of the country where Zorblat Holdings was founded?"
GOLDS = {"0": ["Paris"]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def retriever():
    return KeywordRetriever(PASSAGES)


def rollout(tok, retriever, script: list[str]):
    backend = ScriptedBackend(tok, {Q: script}, PP.query_close)
    return run_rollouts(backend, retriever, PP, [("0", Q)], agent_cfg=AGENT)[0]


GOOD = ["<external>Zorblat Holdings founded</external>",
        "Zorblat Holdings was founded in France.\n<internal>The capital of France is Paris.</internal>\n"
        "<answer>Paris</answer>"]


def judge_one(traj, retriever, tok):
    return sampling.judge([traj], GOLDS, PP, retriever, AGENT.top_k, "policy", 10,
                          added_tokens(tok))[0]


# ----------------------------------------------------------------------------- filters
def test_good_trajectory_passes_every_filter(tok, retriever):
    traj = rollout(tok, retriever, GOOD)
    assert traj.retrievals == 1 and traj.internal_steps == 1
    c = judge_one(traj, retriever, tok)
    assert c.checks == {"format": True, "answer": True, "retrieval": True, "self_docs": True}
    assert c.accepted and c.reasons == []
    assert sampling.knowledge_mix(traj) == "mixed"


def test_forged_document_is_rejected(tok, retriever):
    traj = rollout(tok, retriever, GOOD)
    i = next(k for k, s in enumerate(traj.segments) if s.role == "env")
    seg = traj.segments[i]
    forged = seg.text.replace("founded in 1901", "founded in 1901; the capital of France is Paris")
    traj.segments[i] = Segment("env", forged, tok.encode(forged, add_special_tokens=False))
    c = judge_one(traj, retriever, tok)
    assert c.checks["retrieval"] is False and c.checks["format"] is True and not c.accepted
    assert any(r.startswith("forged document") for r in c.reasons)


def test_edited_passage_ids_are_rejected(tok, retriever):
    traj = rollout(tok, retriever, GOOD)
    traj.retrieved_ids[0] = ["p-fr"] + traj.retrieved_ids[0][1:]
    assert judge_one(traj, retriever, tok).checks["retrieval"] is False


def test_unbalanced_tags_are_rejected(tok, retriever):
    bad = [GOOD[0], GOOD[1].replace("</internal>", "")]
    c = judge_one(rollout(tok, retriever, bad), retriever, tok)
    assert c.checks["format"] is False and c.checks["answer"] is True and not c.accepted
    assert any("internal tags unbalanced" in r for r in c.reasons)


def test_long_answer_is_rejected_even_if_it_covers_the_gold(tok, retriever):
    long = "it is Paris or maybe Berlin or Rome or Madrid or Lisbon"
    c = judge_one(rollout(tok, retriever, [GOOD[0], f"<answer>{long}</answer>"]), retriever, tok)
    assert c.checks["answer"] is False and c.checks["format"] is True and c.checks["retrieval"] is True


def test_self_written_document_with_correct_answer_is_rejected(tok, retriever):
    script = ["<document>\n(1) France: Its capital city is Paris.\n</document>\n<answer>Paris</answer>"]
    traj = rollout(tok, retriever, script)
    assert traj.answer == "Paris" and traj.retrievals == 0
    c = judge_one(traj, retriever, tok)
    assert c.checks["answer"] is True
    assert c.checks["self_docs"] is False and c.checks["format"] is False and not c.accepted


def test_document_after_an_empty_query_is_not_a_retrieval(tok, retriever):
    traj = rollout(tok, retriever, ["<external> </external>", "<answer>Paris</answer>"])
    assert traj.retrievals == 1 and traj.queries == [""]
    c = judge_one(traj, retriever, tok)
    assert c.checks["retrieval"] is False and c.checks["format"] is False


# ----------------------------------------------------------------------------- selection, difficulty
def test_select_prefers_fewer_retrievals_and_drops_duplicates(tok, retriever):
    searched = judge_one(rollout(tok, retriever, GOOD), retriever, tok)
    recalled = judge_one(rollout(tok, retriever, ["<internal>Zorblat Holdings was founded in France.</internal>\n"
                                                  "<answer>Paris</answer>"]), retriever, tok)
    assert recalled.accepted and sampling.knowledge_mix(recalled.traj) == "internal_only"
    twin = replace(searched, traj=replace(searched.traj, sample_index=5))
    picked = sampling.select([searched, twin, recalled], keep=3)
    assert [c.traj.retrievals for c in picked] == [0, 1]  # the duplicate completion is dropped
    assert sampling.select([searched, recalled], keep=2, taken=[recalled]) == [searched]


@pytest.mark.parametrize("n_correct,n,label", [(0, 8, "difficult"), (1, 8, "medium"), (3, 8, "medium"),
                                               (4, 8, "easy"), (8, 8, "easy"), (0, 0, "unknown")])
def test_difficulty_label(n_correct, n, label):
    assert sampling.difficulty_label(n_correct, n, easy_min_rate=0.5, medium_min_rate=0.01) == label


def test_difficulty_label_paper_thresholds():
    # 1 / rate = rollouts needed: < 10 easy, 10-20 medium, > 20 difficult
    assert sampling.difficulty_label(2, 16, 0.1, 0.05) == "easy"
    assert sampling.difficulty_label(1, 16, 0.1, 0.05) == "medium"
    assert sampling.difficulty_label(1, 32, 0.1, 0.05) == "difficult"


# ----------------------------------------------------------------------------- oracle
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny Knowledge World whose (fake) probe knows every capital, with a real BM25 index."""
    from searchrl.retrieval.index import build_index, load_index

    root = tmp_path_factory.mktemp("kw")
    cfg = KnowledgeWorldCfg(n_people=8, n_companies=4, n_works=4, n_countries=6, n_train=24, n_eval=8, n_seen=4)
    cfg.probe.cache_path = str(root / "probe.json")
    def capital(question: str) -> str:
        return next((c.capital[0] for c in kw.COUNTRIES if "capital" in question and c.name in question), "no idea")

    data = kw.generate(cfg, 0, answer_fn=lambda qs: [capital(q) for q in qs])
    build_index(data.world.passages, IndexCfg(kind="bm25"), root / "index")
    return data, load_index(root / "index")


def test_oracle_trajectories_have_real_document_blocks(tok, tiny_world):
    data, index = tiny_world
    res = sampling.run_sampling(data.train, ["oracle"], None, index, PP, AGENT, n_samples=1, temperature=0.0,
                                keep_per_question=2, oracle_variants=2, oracle_tokenizer=tok)
    st = res.stats["samplers"]["oracle"]
    assert st["candidates"] == 2 * len(data.train)
    assert st["pass_rate"]["format"] == 1.0 and st["pass_rate"]["answer"] == 1.0
    assert st["pass_rate"]["retrieval"] == 1.0 and st["pass_rate"]["grounded"] > 0.5
    assert res.stats["questions_covered"] >= 0.5 * len(data.train)
    by_id = {r.id: r for r in data.train}
    for c in res.kept:
        rec = by_id[c.traj.question_id]
        external = [h for h in rec.metadata["hops"] if h["source"] == "external"]
        assert c.traj.retrievals == len(external) == len(c.traj.retrieved_ids)
        assert c.traj.internal_steps == len(rec.metadata["hops"]) - len(external)
        blocks = [s.text for s in c.traj.segments if s.role == "env"]
        # each block is exactly what the index returns for the query, and holds the hop's gold passage
        for block, query, ids, hop in zip(blocks, c.traj.queries, c.traj.retrieved_ids, external, strict=True):
            hits = index.search([query], AGENT.top_k)[0]
            assert block == PP.documents_text(hits, added_tokens(tok))
            assert ids == [h.id for h in hits] and hop["passage_id"] in ids
    mix = res.stats["mix"]
    assert mix["external_only"] > 0 and mix["mixed"] + mix["internal_only"] > 0
    assert {r["difficulty"] for r in res.difficulty} == {"unknown"}  # no model sampler ran


def test_oracle_needs_hop_chains(tok, retriever):
    from searchrl.data.schema import QARecord

    rec = QARecord("x", "hotpotqa", "train", "Who?", ["Bob"], {})
    with pytest.raises(ConfigError, match="hop chain"):
        sampling.oracle_segments(rec, PP)


# ----------------------------------------------------------------------------- evidence oracle (real rows)
REAL_AGENT = AgentCfg(max_total_tokens=1024, max_segment_tokens=160, top_k=3, max_passage_words=60)


@pytest.fixture
def real_rows(shared_data, tmp_path):
    """12 IRCoT HotpotQA and 24 MuSiQue-Ans dev rows, with a BM25 index over the IRCoT rows' paragraphs
    and the 3,372 MuSiQue context paragraphs (where part of the MuSiQue gold paragraphs are)."""
    from searchrl.data import formats
    from searchrl.retrieval.index import build_index, load_index

    ircot = formats.read_qa_file(shared_data / "qa/hotpotqa/dev_ircot500_with_contexts.jsonl", "ircot", "hotpotqa",
                                 "train", limit=12)
    musique = formats.read_qa_file(shared_data / "qa/musique/dev_ans_questions.json", "musique", "musique", "train",
                                   limit=24)
    corpus = formats.read_passage_file(shared_data / "corpus/wiki_paragraphs_musique.jsonl").passages
    passages = list({p.id: p for p in [*ircot.contexts, *corpus]}.values())
    build_index(passages, IndexCfg(kind="bm25"), tmp_path / "index")
    return ircot.records, musique.records, load_index(tmp_path / "index")


@pytest.mark.shared_data
@pytest.mark.parametrize("protocol", ["r1searcher_pp", "r1searcher"])
def test_evidence_oracle_writes_grounded_trajectories_on_real_rows(tok, real_rows, protocol):
    """The oracle on HotpotQA / MuSiQue (no hop chains: the old oracle raised "has no hop chain"): one
    query per gold paragraph, the real documents, a restated sentence of the gold passage, the answer."""
    from searchrl.training.evidence import evidence_steps, split_sentences, title_matches, visible_text

    ircot, musique, index = real_rows
    proto = get_protocol(protocol, REAL_AGENT)
    records = [*ircot, *musique]
    res = sampling.run_sampling(records, ["oracle"], None, index, proto, REAL_AGENT, n_samples=1, temperature=0.0,
                                keep_per_question=1, oracle_tokenizer=tok)
    st = res.stats["samplers"]["oracle"]
    assert st["candidates"] == len(records) and st["no_evidence"] == 0
    assert st["pass_rate"]["retrieval"] == 1.0 and st["pass_rate"]["self_docs"] == 1.0
    assert 0 < st["evidence"]["gold_retrieved"] <= st["evidence"]["gold_blocks"]
    kept_ids = {c.traj.question_id for c in res.kept}
    assert len(kept_ids & {r.id for r in ircot}) >= len(ircot) // 2  # gold paragraphs all in this corpus
    assert kept_ids & {r.id for r in musique}
    by_id = {r.id: r for r in records}
    specials = added_tokens(tok)
    for c in res.kept:
        rec, t = by_id[c.traj.question_id], c.traj
        steps = evidence_steps(rec.question, rec.answers, rec.metadata)
        assert t.retrievals == len(steps) == len(t.queries) and t.answer == rec.answers[0]
        model = [s.text for s in t.segments if s.role == "model"]
        blocks = [s.text for s in t.segments if s.role == "env"]
        for i, (step, query, block) in enumerate(zip(steps, t.queries, blocks, strict=True)):
            hits = index.search([query], REAL_AGENT.top_k)[0]
            assert block == proto.documents_text(hits, specials)  # the engine inserted the real documents
            gold = [h for h in hits if title_matches(h.title, step.title)]
            assert gold, (step.title, query)
            restated = model[i + 1].split("\n", 1)[0]  # a sentence of the gold passage, verbatim
            assert restated in split_sentences(visible_text(gold[0].title, gold[0].text, proto.max_passage_words,
                                                            specials))
        assert proto.validate(t) == [] and sampling.grounded(t, rec, proto)


@pytest.mark.shared_data
def test_evidence_grounded_rejects_missing_gold_and_invented_facts(tok, real_rows):
    ircot, _, index = real_rows
    c = next(c for c in sampling.run_sampling(ircot, ["oracle"], None, index, PP, REAL_AGENT, n_samples=1,
                                              temperature=0.0, keep_per_question=1, oracle_tokenizer=tok).kept)
    rec = next(r for r in ircot if r.id == c.traj.question_id)
    assert sampling.grounded(c.traj, rec, PP)
    # an invented restatement (not text of its block) is not grounded
    i = next(k for k, s in enumerate(c.traj.segments) if s.role == "env") + 1
    seg = c.traj.segments[i]
    invented = replace(c.traj, segments=list(c.traj.segments))
    invented.segments[i] = replace(seg, text="The answer is obvious to everyone.\n" + seg.text.split("\n", 1)[1])
    assert not sampling.grounded(invented, rec, PP)
    # a gold paragraph its query did not bring back is not grounded
    other = replace(rec, metadata={**rec.metadata, "gold_titles": [*rec.metadata["gold_titles"][:-1], "Nowhere Land"]})
    assert not sampling.grounded(c.traj, other, PP)
    assert sampling.gold_in_blocks(c.traj, other, PP)[-1] is False


@pytest.mark.shared_data
def test_oracle_skips_and_counts_records_without_evidence(tok, real_rows):
    from searchrl.data.schema import QARecord

    ircot, _, index = real_rows
    bare = QARecord("r1s-1", "r1s", "train", "Who wrote Hamlet?", ["Shakespeare"], {})
    assert [sampling.oracle_kind(r) for r in (ircot[0], bare)] == ["evidence", None]
    res = sampling.run_sampling([ircot[0], bare], ["oracle"], None, index, PP, REAL_AGENT, n_samples=1,
                                temperature=0.0, keep_per_question=1, oracle_tokenizer=tok)
    st = res.stats["samplers"]["oracle"]
    assert st["no_evidence"] == 1 and st["candidates"] == 1
    with pytest.raises(ConfigError, match="none of the 1 questions has gold evidence"):
        sampling.run_sampling([bare], ["oracle"], None, index, PP, REAL_AGENT, n_samples=1, temperature=0.0,
                              keep_per_question=1, oracle_tokenizer=tok)


# ----------------------------------------------------------------------------- start-up checks
def _params(overlay: dict):
    from searchrl.config import deep_merge, load_yaml, validate
    from tests.conftest import PROJECT_ROOT

    return validate(deep_merge(load_yaml(PROJECT_ROOT / "params.yaml"), overlay))


def _jsonl(train: list[dict], corpus: str) -> dict:
    return {"source": "jsonl", "jsonl": {"train": train, "corpus": [{"path": corpus, "format": "passages"}]}}


@pytest.mark.shared_data
@pytest.mark.parametrize("train,ok", [
    ([{"path": "qa/r1searcher/train/stage_2.jsonl", "format": "r1searcher"}], False),
    ([{"path": "qa/r1searcher/train/stage_2.jsonl", "format": "auto"}], False),  # sniffed
    ([{"path": "qa/flashrag/nq_test.jsonl", "format": "flashrag"}], False),
    ([{"path": "qa/musique/dev_ans_questions.json", "format": "musique"}], True),
    ([{"path": "qa/hotpotqa/dev_distractor_first100.json", "format": "auto"}], True),
    ([{"path": "qa/hotpotqa/dev_ircot500_with_contexts.jsonl", "format": "ircot"}], True),
    ([{"path": "qa/r1searcher/train/stage_2.jsonl", "format": "r1searcher"},  # some evidence: the oracle
      {"path": "qa/musique/dev_ans_questions.json", "format": "musique"}], True),  # fills those questions
])
def test_oracle_sampler_without_evidence_is_a_start_up_error(shared_data, train, ok):
    """Decided from the params alone, at load time (the old code started and failed in the sample stage)."""
    train = [{**t, "path": str(shared_data / t["path"])} for t in train]
    overlay = {"prepare": _jsonl(train, str(shared_data / "corpus/wiki_paragraphs_musique.jsonl")),
               "sample": {"sampler": ["policy", "oracle"]}, "rl": {"rewriter": "policy"}}
    if ok:
        assert _params(overlay).sample.sampler == ["policy", "oracle"]
        return
    with pytest.raises(ConfigError) as err:
        _params(overlay)
    msg = str(err.value)
    assert "sample.sampler: 'oracle' needs gold evidence (Knowledge World hop chains or HotpotQA/2Wiki/MuSiQue " \
           "supporting facts); prepare.source jsonl with format " in msg and msg.endswith("— use policy or teacher")
    assert "\n" not in msg
    overlay["sample"]["sampler"] = ["policy"]  # the same source with a model sampler is fine
    assert _params(overlay).sample.sampler == ["policy"]


@pytest.mark.shared_data
def test_hf_source_evidence_by_dataset_name(shared_data):
    corpus = [{"path": str(shared_data / "corpus/wiki_paragraphs_musique.jsonl"), "format": "passages"}]
    base = {"sample": {"sampler": ["oracle"]}, "rl": {"rewriter": "policy"}}
    with pytest.raises(ConfigError, match="prepare.source hf with dataset bamboogle has none"):
        _params({**base, "prepare": {"source": "hf", "hf": {"datasets": [{"name": "bamboogle", "role": "train"}],
                                                             "corpus": corpus}}})
    for name in ("hotpotqa", "2wikimultihopqa", "musique"):
        datasets = [{"name": name, "role": "train"}, {"name": "bamboogle"}]
        assert _params({**base, "prepare": {"source": "hf", "hf": {"datasets": datasets, "corpus": corpus}}})


@pytest.mark.shared_data
@pytest.mark.parametrize("preset", ["configs/hotpotqa_local.yaml", "configs/smoke_real.yaml"])
def test_real_data_presets_pass_the_start_up_checks(shared_data, preset):
    from searchrl.config import load_params
    from tests.conftest import PROJECT_ROOT

    p = load_params(PROJECT_ROOT / "params.yaml", preset=PROJECT_ROOT / preset)
    assert "oracle" in p.sample.sampler and p.rl.rewriter == "oracle"
    assert all(s.format == "musique" for s in p.prepare.jsonl.train)


def test_model_sampler_fills_only_and_labels_difficulty(tok, tiny_world):
    """policy (scripted: right on even questions, wrong on odd) first, oracle fills the rest."""
    data, index = tiny_world
    records = data.train[:6]
    scripts = {r.question: [f"<answer>{r.answers[0] if i % 2 == 0 else 'Nobody'}</answer>"]
               for i, r in enumerate(records)}
    backend = ScriptedBackend(tok, scripts, PP.query_close)
    res = sampling.run_sampling(records, ["policy", "oracle"], lambda name: backend, index, PP, AGENT, n_samples=2,
                                temperature=1.0, keep_per_question=1, oracle_variants=1, oracle_tokenizer=tok)
    st = res.stats["samplers"]
    assert st["policy"]["candidates"] == 12 and st["policy"]["accepted"] == 6
    assert st["policy"]["pass_rate"]["answer"] == 0.5
    assert st["oracle"]["questions"] == 3  # only the questions the policy left empty
    assert res.stats["kept_by_sampler"]["policy"] == 3
    labels = {row["id"]: row["difficulty"] for row in res.difficulty}
    assert [labels[r.id] for r in records] == ["easy", "difficult"] * 3


# ----------------------------------------------------------------------------- HTTP teacher
SECRET = "sk-test-0123456789abcdef"


class _Teacher(BaseHTTPRequestHandler):
    """A scripted OpenAI-compatible server: searches once, then answers; drops the stop string from
    its text (as OpenAI does)."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != f"Bearer {SECRET}":
            self._reply(401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
            return
        if self.path.endswith("/chat/completions"):
            so_far = body["messages"][-1]["content"] if body["messages"][-1]["role"] == "assistant" else ""
        else:
            so_far = body["prompt"]
        text = "<answer>Paris" if so_far.endswith("</document>\n") else "<external>Zorblat Holdings founded"
        choice = {"index": 0, "finish_reason": "stop"}
        if self.path.endswith("/chat/completions"):
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._reply(200, {"choices": [choice]})

    def _reply(self, code: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Teacher.requests = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_http_teacher_runs_the_agent_loop(tok, retriever, server, api, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    backend = OpenAIBackend(server, tok, PP, api=api, model="big-teacher", api_key_env="TEACHER_KEY",
                            concurrency=2)
    trajs = run_rollouts(backend, retriever, PP, [("0", Q)], n=2, temperature=1.0, agent_cfg=AGENT,
                         source="teacher")
    for t in trajs:
        assert t.finish_reason == "answered" and t.answer == "Paris" and t.retrievals == 1
        assert t.segments[0].text == "<external>Zorblat Holdings founded</external>"  # stop string restored
        assert t.segments[0].token_ids == tok.encode(t.segments[0].text, add_special_tokens=False)
        assert t.logprobs == [0.0] * len(t.completion_ids)
    cands = sampling.judge(trajs, GOLDS, PP, retriever, AGENT.top_k, "teacher", 10, added_tokens(tok))
    assert all(c.accepted for c in cands)
    reqs = _Teacher.requests
    assert len(reqs) == 4 and all(r["auth"] == f"Bearer {SECRET}" for r in reqs)
    assert all(r["path"] == f"/v1/{'chat/completions' if api == 'chat' else 'completions'}" for r in reqs)
    assert all(r["body"]["model"] == "big-teacher" and r["body"]["stop"] == PP.stops for r in reqs)
    if api == "chat":
        first = next(r for r in reqs if len(r["body"]["messages"]) == 2)["body"]
        assert first["messages"][0]["content"] == PP.system_prompt() and first["messages"][1]["content"] == Q
        cont = next(r for r in reqs if len(r["body"]["messages"]) == 3)["body"]
        assert cont["continue_final_message"] is True and cont["messages"][2]["role"] == "assistant"
    # the key is in no log record and no written output
    out = tmp_path / "trajectories.jsonl"
    out.write_text("".join(json.dumps(sampling.jsonl_row(c, "fp")) + "\n" for c in cands))
    assert SECRET not in caplog.text and SECRET not in out.read_text()


def test_http_teacher_error_names_status_and_hides_the_key(tok, server, monkeypatch, caplog):
    monkeypatch.setenv("TEACHER_KEY", "wrong-key-but-secret")
    backend = OpenAIBackend(server, tok, PP, api_key_env="TEACHER_KEY", concurrency=1, max_retries=0)
    prompt = PP.prompt_ids(tok, Q)[1]
    with pytest.raises(TeacherError, match="HTTP 401") as err:
        backend.generate([prompt], max_new_tokens=16, stop=PP.stops)
    assert "wrong-key-but-secret" not in str(err.value) and "***" in str(err.value)
    assert "wrong-key-but-secret" not in caplog.text


def test_chat_prompt_parser_recovers_messages(tok):
    parser = ChatPromptParser(tok)
    ids = PP.prompt_ids(tok, Q)[1] + tok.encode("<external>x</external>", add_special_tokens=False)
    assert parser.parse(ids) == (PP.system_prompt(), Q, "<external>x</external>")
