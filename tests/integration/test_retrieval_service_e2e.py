"""The retrieval service end to end: `python -m searchrl.retrieval.serve` started by the test over a
real dense index (MiniLM, Flat), the RL stage searching through it (retrieval.url -> retries -> cache
-> HTTP), a Search-R1-style client request, request coalescing under concurrent clients, and the
fault behaviour: a fifth of requests answered 500, the server killed mid-run and restarted, the
server gone for good; and the flow starting the server for a run.

The policy is a 2-layer llama whose weights are set by hand to a bigram model that always searches:
after any token it writes `<external>`, then two of 32 word pieces drawn at random, then
`</external>` (attention and MLP outputs zeroed, so the residual stream is the current token's
embedding). Its queries vary from rollout to rollout, so they reach the server instead of the cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from searchrl import services
from searchrl.config import validate
from searchrl.data.schema import Passage, qa_frame
from searchrl.retrieval.factory import open_retriever
from searchrl.retrieval.retry import RetrievalError
from searchrl.training import rl as RL

sys.path.insert(0, str(Path(__file__).parent))
from test_rl import PASSAGES, RECORDS  # noqa: E402

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- fixtures
def searching_policy(tok, out: Path, words: int = 32) -> Path:
    """The hand-set bigram llama described in the module docstring, saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from searchrl.agent.backends import decode, encode

    lt, ext, gt, close = (encode(tok, s)[0] for s in ("<", "external", ">", "</"))
    plain, spaced = [], []
    for i in range(len(tok)):
        piece = decode(tok, [i])
        if re.fullmatch(r"[a-z]{4,8}", piece) and len(plain) < words:
            plain.append(i)
        elif re.fullmatch(r" [a-z]{4,8}", piece) and len(spaced) < words:
            spaced.append(i)
    d = 32
    config = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    basis = torch.eye(d)
    with torch.no_grad():
        for layer in model.model.layers:  # residual stream = the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        head.zero_()
        emb[:, 0] = 1.0  # state 0: any other token (end of prompt, end of documents) -> "<"
        states = {lt: 1, ext: 2, gt: 3, close: 5, **{t: 4 for t in plain}, **{t: 6 for t in spaced}}
        for t, s in states.items():
            emb[t] = basis[s]
        b = 3.0  # logit b * sqrt(d) = 17 over 49k zero logits: the intended next token w.p. > 0.99
        head[lt] = b * basis[0]
        head[ext] = b * (basis[1] + basis[5])  # after "<" and after "</"
        head[gt] = b * basis[2]
        for t in plain:  # after "<external>": one of 32 pieces
            head[t] = b * basis[3]
        for t in spaced:  # then one of 32 spaced pieces
            head[t] = b * basis[4]
        head[close] = b * basis[6]  # then "</external>"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return searching_policy(smollm2_tokenizer, tmp_path_factory.mktemp("searching-policy"))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    from searchrl.config import IndexCfg
    from searchrl.retrieval.index import build_index

    out = tmp_path_factory.mktemp("service") / "index"
    build_index([Passage(i, t, x, "test") for i, t, x in PASSAGES], IndexCfg(batch_size=8, shard_size=8), out,
                progress=False)
    return out


def serve_cmd(index: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "searchrl.retrieval.serve", "--index", str(index), "--port", str(port),
            "--threads", "1", *extra]


@contextlib.contextmanager
def server(index: Path, log: Path, *extra: str):
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    with services.running(serve_cmd(index, port, *extra), f"{url}/health", log_path=log, timeout_s=300,
                          name="retrieval server", grace_s=10) as svc:
        yield url, svc


@pytest.fixture(scope="module")
def shared_server(index_dir, tmp_path_factory):
    with server(index_dir, tmp_path_factory.mktemp("logs") / "serve.log") as (url, _):
        yield url


def params_for(tmp: Path, model_dir: Path, url: str, retries: int = 3, backoff_s: float = 0.5, **rl):
    (tmp / "prepared").mkdir(parents=True, exist_ok=True)
    qa_frame(RECORDS).to_parquet(tmp / "prepared" / "train.parquet")
    raw = {
        "seed": 0,
        "agent": {"max_segment_tokens": 12, "max_total_tokens": 160, "batch_size": 8, "max_retrievals": 2,
                  "top_k": 2, "cache_path": str(tmp / "cache" / "retrieval.sqlite"),
                  "retrieval_retries": retries, "retrieval_backoff_s": backoff_s},
        "prepare": {"out_dir": str(tmp / "prepared")},
        "sample": {"out_dir": str(tmp / "sft")},
        "index": {"out_dir": str(tmp / "no-local-index")},
        "retrieval": {"url": url},
        "rl": {"init": str(model_dir), "max_steps": 2, "num_generations": 2, "prompts_per_step": 2,
               "micro_batch_size": 2, "difficulty": [], "save_steps": 1, "beta": 0.0, "lr": 1e-4,
               "memorization": False, "out_dir": str(tmp / "models" / "rl"), "metrics_dir": str(tmp / "reports"),
               "checkpoint_dir": str(tmp / "ckpt"), **rl},
    }
    return validate(raw)


def stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=10).json()


def train(params, retriever=None) -> tuple[dict, list[dict]]:
    logged: list[dict] = []
    metrics = RL.train_rl(params, retriever=retriever, mlflow_log=lambda m, step: logged.append(m))
    return metrics, logged


# ----------------------------------------------------------------------------- the service at work
def test_rl_smoke_run_searches_through_the_service(tmp_path, policy_dir, shared_server, index_dir):
    from searchrl.retrieval.cache import CachedRetriever
    from searchrl.retrieval.index import index_manifest_hash

    before = stats(shared_server)["queries"]
    params = params_for(tmp_path, policy_dir, shared_server)
    metrics, logged = train(params)  # the stage's own path: open_retriever(params) -> the service
    assert metrics["steps"] == 2 and len(logged) == 2
    assert all(m["search/retrievals"] == 2.0 for m in logged)  # every rollout searched twice
    served = stats(shared_server)["queries"] - before
    assert served > 0
    # the cache in front holds the service's answers under the index's own manifest hash
    cache = CachedRetriever(None, params.agent.cache_path, manifest_hash=index_manifest_hash(index_dir),
                            loader=lambda: None)
    assert len(cache) == served
    assert (tmp_path / "models" / "rl" / "config.json").exists()


def test_a_search_r1_client_request_is_answered(shared_server):
    payload = {"queries": ["Where was Talo Vesk born?", "Who founded Bantex Labs?"], "topk": 3,
               "return_scores": True}  # search_r1/search/retrieval_request.py
    resp = requests.post(f"{shared_server}/retrieve", json=payload, timeout=30)
    resp.raise_for_status()
    result = resp.json()["result"]
    assert len(result) == 2 and all(len(row) == 3 for row in result)
    top = result[0][0]
    assert top["document"]["id"] == "p1" and isinstance(top["score"], float)
    title, _, text = top["document"]["contents"].partition("\n")  # how Search-R1's client splits it
    assert (title, text) == ('"Talo Vesk"', "Talo Vesk is a chemist who was born in Peru.")
    assert result[1][0]["document"]["id"] == "p4"


def test_concurrent_clients_cost_batched_searches(shared_server):
    before = stats(shared_server)
    barrier = threading.Barrier(32)
    codes: list[int] = []

    def client(i: int) -> None:
        barrier.wait()
        r = requests.post(f"{shared_server}/search", json={"queries": [f"Mira Sol employer {i}"], "k": 2}, timeout=60)
        codes.append(r.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(shared_server)
    assert codes == [200] * 32 and after["requests"] - before["requests"] == 32
    assert after["searches"] - before["searches"] < 16  # coalesced: far fewer index searches than requests


# ----------------------------------------------------------------------------- faults
def first_failing_seed(rate: float, within: int = 2) -> int:
    """A --fail-seed whose first `within` requests include an injected fault (so a short run sees one)."""
    return next(s for s in range(1000) if any(random.Random(s).random() < rate for _ in range(within)))


def test_a_fifth_of_requests_failing_still_completes_and_logs_the_retries(tmp_path, policy_dir, index_dir):
    seed = first_failing_seed(0.2)
    with server(index_dir, tmp_path / "serve.log", "--fail-rate", "0.2", "--fail-seed", str(seed)) as (url, _):
        params = params_for(tmp_path, policy_dir, url, retries=6, backoff_s=0.05)
        retriever = open_retriever(params)
        metrics, logged = train(params, retriever)
        faults = stats(url)["injected_faults"]
    assert metrics["steps"] == 2
    assert faults > 0 and retriever.retries == faults and retriever.failures == 0
    assert sum(m["search/retrieval_retries"] for m in logged) == retriever.retries


def test_server_killed_mid_run_and_restarted_the_stage_completes(tmp_path, policy_dir, index_dir):
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    first = services.start(serve_cmd(index_dir, port), log_path=log, name="retrieval server")
    services.wait_healthy(f"{url}/health", 300, first)
    params = params_for(tmp_path, policy_dir, url, retries=8, backoff_s=0.5, max_steps=3)
    retriever = open_retriever(params)
    done, events = threading.Event(), {}

    def chaos() -> None:  # kill the server once rollouts are searching, restart it, keep it until the end
        while stats(url)["queries"] == 0:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.proc.wait()
        events["killed"] = time.time()
        time.sleep(1.0)
        second = services.start(serve_cmd(index_dir, port), log_path=log, name="retrieval server")
        services.wait_healthy(f"{url}/health", 300, second)
        events["back"] = time.time()
        done.wait(600)  # the parent-death signal follows this thread: it must outlive the run
        events["second_queries"] = stats(url)["queries"]
        services.stop(second, grace_s=10)

    t = threading.Thread(target=chaos)
    t.start()
    try:
        metrics, logged = train(params, retriever)
    finally:
        done.set()
        t.join(60)
    assert "killed" in events and "back" in events
    assert metrics["steps"] == 3 and retriever.retries >= 1 and retriever.failures == 0
    assert events["second_queries"] > 0  # the restarted server answered the rest of the run
    assert sum(m["search/retrieval_retries"] for m in logged) == retriever.retries


def test_server_gone_for_good_fails_in_one_line_and_keeps_what_was_written(tmp_path, policy_dir, index_dir):
    from searchrl.retrieval.cache import CachedRetriever

    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    svc = services.start(serve_cmd(index_dir, port), log_path=tmp_path / "serve.log", name="retrieval server")
    services.wait_healthy(f"{url}/health", 300, svc)
    params = params_for(tmp_path, policy_dir, url, retries=2, backoff_s=0.1, max_steps=4)

    def kill_after_first_checkpoint() -> None:
        while not list((tmp_path / "ckpt").glob("rl-*/rl/checkpoint-1/trainer_state.json")):
            time.sleep(0.05)
        services.stop(svc, grace_s=0)

    t = threading.Thread(target=kill_after_first_checkpoint)
    t.start()
    try:
        with pytest.raises(RetrievalError) as err:
            train(params)
    finally:
        t.join(60)
        services.stop(svc, grace_s=0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"retrieval failed 3 times on retrieval service {url}: query ")
    assert msg.endswith(f"ServiceUnavailable: POST {url}/search: connection refused")
    # nothing written before is lost: the checkpoint to resume from, the cached searches
    assert list((tmp_path / "ckpt").glob("rl-*/rl/checkpoint-1/model.safetensors"))
    assert not (tmp_path / "models" / "rl").exists()
    cache = CachedRetriever(None, params.agent.cache_path, manifest_hash=open_manifest(index_dir), loader=lambda: None)
    assert len(cache) > 0
    # the server back: a rerun resumes from the checkpoint and completes
    with services.running(serve_cmd(index_dir, port), f"{url}/health", log_path=tmp_path / "serve.log",
                          timeout_s=300, grace_s=10):
        metrics, _ = train(params)
    assert metrics["steps"] == 4 and (tmp_path / "models" / "rl" / "config.json").exists()


def open_manifest(index_dir: Path) -> str:
    from searchrl.retrieval.index import index_manifest_hash

    return index_manifest_hash(index_dir)


# ----------------------------------------------------------------------------- the flow's server
def test_the_flow_starts_one_server_for_the_run_and_stops_it(tmp_path, index_dir, monkeypatch):
    import flows.pipeline as P
    from searchrl.config import load_raw
    from tests.conftest import PROJECT_ROOT

    port = services.free_port()
    raw = load_raw(PROJECT_ROOT / "params.yaml")
    workspace = tmp_path / "ws"
    (workspace / "data").mkdir(parents=True)
    os.symlink(index_dir, workspace / "data" / "index")  # index.out_dir of the default params
    raw["retrieval"] = {"serve": {"managed": True, "port": port, "threads": 1, "stop_grace_s": 10}}
    params = validate(raw)
    url = params.retrieval.url
    assert url == f"http://127.0.0.1:{port}"
    monkeypatch.setattr(P, "stage_up_to_date", lambda workspace, stage: stage == "sample")
    log = logging.getLogger("test")
    started: dict = {}
    with contextlib.ExitStack() as run_scope:
        assert P.retrieval_service(params, "index", workspace, {}, run_scope, started, log) is None
        assert P.retrieval_service(params, "sample", workspace, {}, run_scope, started, log) is None  # up to date
        svc = P.retrieval_service(params, "rl", workspace, {}, run_scope, started, log)
        assert svc is not None and services.probe(f"{url}/health")
        assert P.retrieval_service(params, "evaluate", workspace, {}, run_scope, started, log) is svc
        assert P.retrieval_service(params, "rl_ablation@x", workspace, {}, run_scope, started, log) is svc
        served = requests.get(f"{url}/manifest", timeout=10).json()["manifest_hash"]
        assert served == open_manifest(index_dir)
        with pytest.raises(services.ServiceError, match=rf"something already answers {url}/health"):
            P.retrieval_service(params, "evaluate", workspace, {}, contextlib.ExitStack(), {}, log)
    assert not svc.running() and not services.probe(f"{url}/health")
    assert "ready after" in (workspace / "logs" / "retrieval_server.log").read_text()


def test_an_existing_service_that_is_down_stops_the_flow_before_it_starts(tmp_path):
    from flows.pipeline import check_retrieval_service
    from searchrl.config import RetrievalCfg
    from searchrl.errors import ConfigError

    url = f"http://127.0.0.1:{services.free_port()}"
    with pytest.raises(ConfigError, match=rf"the retrieval service at {url} does not answer GET /health"):
        check_retrieval_service(RetrievalCfg(url=url))
    with pytest.raises(ConfigError, match="a probe POST /retrieve"):
        check_retrieval_service(RetrievalCfg(url=url + "/retrieve", api="search_r1"))
