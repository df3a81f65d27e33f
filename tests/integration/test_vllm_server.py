"""The served-policy path without vLLM: tests/vllm_standin.py implements the documented HTTP contract of
`vllm serve` (what TRL 1.16's VLLMClient and searchrl/agent/vllm_server.py speak) with a real tiny
transformers model, and everything here runs against it: the client's tokens and logprobs against the
model's own forward pass, stop strings, seeds, failures, search rollouts through the engine, and the
flow-managed server's start / health / stop. No real vLLM engine runs in these tests."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests
import torch

from searchrl import services
from searchrl.agent.backends import decode
from searchrl.agent.vllm_server import VLLMServerBackend, VLLMServerError

ROOT = Path(__file__).resolve().parents[2]
STANDIN = str(ROOT / "tests" / "vllm_standin.py")


def standin_command(model_dir, port: int, *flags: str) -> list[str]:
    return [sys.executable, STANDIN, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), *flags]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The stand-in serving the tiny random llama (started and stopped by searchrl.services)."""
    port = services.free_port()
    log = tmp_path_factory.mktemp("standin") / "server.log"
    with services.running(standin_command(tiny_model_dir, port), f"http://127.0.0.1:{port}/health",
                          env={"VLLM_SERVER_DEV_MODE": "1"}, log_path=log, timeout_s=180, interval_s=0.2,
                          grace_s=10) as svc:
        yield f"http://127.0.0.1:{port}", svc


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def backend(server, smollm2_tokenizer):
    return VLLMServerBackend(server[0], smollm2_tokenizer, retries=1, backoff_s=0.01, concurrency=4)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def forward_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
    """log p(completion[i] | prompt + completion[:i]) of logits / temperature, one full forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1: -1] / temperature, -1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


PROMPTS = ["Who founded Zorvath Inc?", "The capital of France is a city called"]


# ----------------------------------------------------------------------------- tokens and logprobs
def test_greedy_tokens_and_logprobs_are_the_models(backend, model, smollm2_tokenizer):
    prompts = [smollm2_tokenizer.encode(p) for p in PROMPTS]
    gens = backend.generate(prompts, max_new_tokens=[12, 7], temperature=0.0)
    for p, g, budget in zip(prompts, gens, [12, 7], strict=True):
        assert g.token_ids == greedy(model, p, budget)
        assert (g.finish, len(g.token_ids)) == ("length", budget)
        assert g.logprobs == pytest.approx(forward_logprobs(model, p, g.token_ids), abs=1e-4)
        assert g.text == decode(smollm2_tokenizer, g.token_ids)


def test_sampled_logprobs_are_of_the_distribution_sampled_from(backend, model, smollm2_tokenizer):
    p = smollm2_tokenizer.encode(PROMPTS[0])
    [g] = backend.generate([p], max_new_tokens=10, temperature=0.7, seed=5)
    assert len(g.token_ids) == 10
    assert g.logprobs == pytest.approx(forward_logprobs(model, p, g.token_ids, temperature=0.7), abs=1e-4)


def test_stop_strings_end_a_row_where_its_text_first_contains_one(backend, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    p = tok.encode(PROMPTS[1])
    full = greedy(model, p, 24)
    text = decode(tok, full)
    start = len(decode(tok, full[:10]))
    stop = text[start: start + 4]  # a piece of what the model writes from its 11th token on
    assert stop.strip(), "the greedy continuation is whitespace"
    k = next(i for i in range(1, len(full) + 1) if stop in decode(tok, full[:i]))
    [g, other] = backend.generate([p, p], max_new_tokens=[24, 24], stop=["<never>", stop], temperature=0.0)
    assert (g.token_ids, g.finish, g.stop) == (full[:k], "stop", stop)
    assert g.text == decode(tok, full[:k]) and stop in g.text
    assert other.token_ids == g.token_ids


def test_a_seed_fixes_the_sample_and_each_row_gets_its_own(backend, smollm2_tokenizer):
    p = smollm2_tokenizer.encode(PROMPTS[0])
    first = backend.generate([p] * 4, max_new_tokens=6, temperature=1.0, seed=123)
    again = backend.generate([p] * 4, max_new_tokens=6, temperature=1.0, seed=123)
    other = backend.generate([p] * 4, max_new_tokens=6, temperature=1.0, seed=124)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    # the 4 copies of one prompt (a GRPO group) are 4 different samples, not one sample 4 times
    assert len({tuple(g.token_ids) for g in first}) == 4
    # row i samples with seed + i: the rows shift by one when the seed does
    assert [g.token_ids for g in other[:3]] == [g.token_ids for g in first[1:]]


def test_trl_client_reads_the_standin_replies(server, smollm2_tokenizer):
    """The stand-in answers the way TRL 1.16's VLLMClient expects (its own parsing code, no vLLM import)."""
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient.__new__(VLLMClient)  # __init__ needs vllm importable; the HTTP methods do not
    client.session, client.base_url = requests.Session(), server[0]
    client.model = client._get(f"{server[0]}/v1/models")["data"][0]["id"]
    p = smollm2_tokenizer.encode(PROMPTS[0])
    out = client.generate(prompts=[p, p[:5]], n=2, temperature=1.0, max_tokens=5, logprobs=0,
                          generation_kwargs={"seed": 3})
    assert out["prompt_ids"] == [p, p[:5]]
    assert [len(c) for c in out["completion_ids"]] == [5, 5, 5, 5]
    assert [[len(x) for x in row] for row in out["logprobs"]] == [[1] * 5] * 4
    assert out["logprob_token_ids"] == [[[t] for t in c] for c in out["completion_ids"]]
    assert client.get_world_size() == 1
    assert client.get_server_info()["model_config"]["served_model_name"] == client.model


# ----------------------------------------------------------------------------- failures
def test_a_server_that_is_down_is_one_error_naming_its_url(smollm2_tokenizer):
    url = f"http://127.0.0.1:{services.free_port()}"
    b = VLLMServerBackend(url, smollm2_tokenizer, retries=2, backoff_s=0.01)
    with pytest.raises(VLLMServerError, match=rf"^vLLM server at {url}: unreachable after 3 attempts"):
        b.generate([[1, 2, 3]], max_new_tokens=4)
    assert not b.health()


@pytest.fixture
def failing(server):
    def fail(count: int, status: int = 500):
        requests.post(f"{server[0]}/standin/fail", json={"status": status, "count": count}, timeout=10)

    yield fail
    fail(0)


def test_a_5xx_is_retried(backend, failing, smollm2_tokenizer):
    failing(1)  # the next request answers 500; retries=1 sends it again
    [g] = backend.generate([smollm2_tokenizer.encode(PROMPTS[0])], max_new_tokens=3, temperature=0.0)
    assert len(g.token_ids) == 3


def test_a_5xx_that_persists_is_one_error_naming_the_url(backend, failing, server, smollm2_tokenizer):
    backend.generate([[1]], max_new_tokens=1)  # model name resolved before the failures start
    failing(10)
    with pytest.raises(VLLMServerError, match=rf"^vLLM server at {server[0]}: POST /v1/completions answered "
                                               r"HTTP 500: .*stand-in: failing"):
        backend.generate([smollm2_tokenizer.encode(PROMPTS[0])], max_new_tokens=3)


def test_a_model_the_server_does_not_serve_is_named(server, smollm2_tokenizer):
    b = VLLMServerBackend(server[0], smollm2_tokenizer, model="Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(VLLMServerError, match=r"serves .*tiny-llama.*, not 'Qwen/Qwen2.5-7B-Instruct'"):
        b.generate([[1, 2]], max_new_tokens=2)


# ----------------------------------------------------------------------------- search rollouts
CORPUS = [("p1", "Zorvath Inc", "Zorvath Inc was founded by Mira Quell in 1999."),
          ("p2", "Mira Quell", "Mira Quell was born in Oslo, Norway.")]
QUESTION = "Who founded Zorvath Inc?"
SCRIPT = {QUESTION: ["I am not sure. <external>Zorvath Inc founder</external>", " <answer>Mira Quell</answer>"]}


def agent_cfg(**kw):
    from searchrl.config import AgentCfg

    return AgentCfg(max_retrievals=2, max_segment_tokens=48, max_total_tokens=256, top_k=1, **kw)


@pytest.fixture(scope="module")
def searcher(smollm2_tokenizer, tmp_path_factory):
    """A tiny llama trained until its greedy decode IS one search trajectory (it writes a query, reads the
    retrieved passage, answers): a real model whose rollouts exercise retrieval. Returns (dir, scripted
    trajectory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from searchrl.agent.engine import run_rollouts
    from searchrl.agent.fakes import KeywordRetriever, ScriptedBackend
    from searchrl.agent.protocols import get_protocol

    tok = smollm2_tokenizer
    proto = get_protocol("r1searcher_pp")
    [traj] = run_rollouts(ScriptedBackend(tok, SCRIPT, proto.query_close), KeywordRetriever(CORPUS), proto,
                          [QUESTION], agent_cfg=agent_cfg())
    assert (traj.retrievals, traj.finish_reason) == (1, "answered")
    ids = traj.prompt_ids + traj.completion_ids
    n = len(traj.prompt_ids)
    learn = [i for i in range(n, len(ids)) if traj.env_mask[i - n]]  # the model's own tokens
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, pos, target = torch.tensor([ids]), torch.tensor([i - 1 for i in learn]), torch.tensor([ids[i] for i in learn])
    steps = 0
    while steps < 400:
        steps += 1
        logits = model.lm_head(model.model(input_ids=x).last_hidden_state[0, pos])
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02 and bool((logits.argmax(-1) == target).all()):
            break
    assert loss.item() < 0.02, f"the tiny searcher did not learn its trajectory in {steps} steps"
    out = tmp_path_factory.mktemp("searcher")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, traj


@pytest.mark.slow
def test_search_rollouts_through_the_served_policy(searcher, smollm2_tokenizer, tmp_path):
    """run_rollouts with the server backend: the served model searches, the engine retrieves and
    inserts the passage, the model answers; tokens, logprobs and masks are the model's, and the same
    as the in-process HF backend's. Evaluation and rejection sampling run on the same backend."""
    from transformers import AutoModelForCausalLM

    from searchrl.agent.backends import HFBackend, make_backend
    from searchrl.agent.engine import run_rollouts
    from searchrl.agent.fakes import KeywordRetriever
    from searchrl.agent.protocols import get_protocol
    from searchrl.data.schema import QARecord
    from searchrl.evaluation import predict_agent
    from searchrl.training.sampling import run_sampling

    model_dir, scripted = searcher
    tok = smollm2_tokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    port = services.free_port()
    with services.running(standin_command(model_dir, port), f"http://127.0.0.1:{port}/health",
                          log_path=tmp_path / "server.log", timeout_s=180, interval_s=0.2, grace_s=10):
        b = VLLMServerBackend(f"http://127.0.0.1:{port}", tok, concurrency=4)
        [t] = run_rollouts(b, KeywordRetriever(CORPUS), "r1searcher_pp", [QUESTION], agent_cfg=agent_cfg())
        seeds = []  # the seed each request of the sampled group carries
        one = b._one
        b._one = lambda *args: seeds.append(args[-1]) or one(*args)
        sampled = run_rollouts(b, KeywordRetriever(CORPUS), "r1searcher_pp", [QUESTION], n=3, temperature=1.0,
                               seed=7, agent_cfg=agent_cfg())
        # evaluation and rejection sampling against the served policy (agent.backend: vllm_server)
        cfg = agent_cfg(backend="vllm_server", vllm_server_url=f"http://127.0.0.1:{port}")
        served = make_backend(SimpleNamespace(model=str(model_dir)), cfg, tokenizer=tok)  # what the stages call
        assert isinstance(served, VLLMServerBackend) and served.model == str(model_dir)
        record = QARecord("q1", "toy", "train", QUESTION, ["Mira Quell"])
        [pred] = predict_agent(served, KeywordRetriever(CORPUS), [record], "r1searcher_pp", cfg, "agent_r1searcher_pp")
        result = run_sampling([record], ["policy"], lambda name: served, KeywordRetriever(CORPUS),
                              get_protocol("r1searcher_pp"), cfg, n_samples=2, temperature=0.0, keep_per_question=1)
    assert (pred.prediction, pred.scores["em"], pred.retrievals) == ("Mira Quell", 1.0, 1)
    assert (result.difficulty[0]["n_samples"], result.difficulty[0]["n_correct"]) == (2, 2)
    assert (t.retrievals, t.finish_reason, t.answer) == (1, "answered", "Mira Quell")
    assert t.queries == ["Zorvath Inc founder"] and t.retrieved_ids == [["p1"]]
    assert t.completion_ids == scripted.completion_ids and t.env_mask == scripted.env_mask
    [hf] = run_rollouts(HFBackend(model, tok), KeywordRetriever(CORPUS), "r1searcher_pp", [QUESTION],
                        agent_cfg=agent_cfg())
    assert hf.completion_ids == t.completion_ids
    for traj in [t, *sampled]:  # every model token's logprob is the model's, given the whole history
        lp = forward_logprobs(model, traj.prompt_ids, traj.completion_ids)
        served = [x for x, m in zip(traj.logprobs, traj.env_mask, strict=True) if m]
        assert served == pytest.approx([x for x, m in zip(lp, traj.env_mask, strict=True) if m], abs=1e-3)
        assert traj.finish_reason in ("answered", "length", "malformed", "max_retrievals")
    # a group samples each rollout with its own seed (one seed for all would make the group identical;
    # whether the samples then differ is up to the model, which was trained to write one trajectory)
    assert len(set(seeds)) >= len(sampled) == 3 and None not in seeds


# ----------------------------------------------------------------------------- the flow-managed server
def managed_params(model_dir, port: int, gpus: str = "3"):
    from searchrl.config import load_raw, validate

    raw = load_raw(ROOT / "params.yaml")
    raw["rl"].update(use_vllm=True, vllm_mode="server", init=str(model_dir))
    raw["vllm_server"] = {
        "managed": True, "port": port, "gpus": gpus, "startup_timeout_s": 180, "stop_grace_s": 10,
        # the default command with `vllm` replaced by the stand-in: same placeholders, same flags
        "command": ["{python}", STANDIN, "serve", "{model}", "--host", "{host}", "--port", "{port}",
                    "--tensor-parallel-size", "{tensor_parallel_size}", "--dtype", "{dtype}",
                    "--weight-transfer-config", '{"backend": "nccl"}', "--logprobs-mode", "processed_logprobs"]}
    return validate(raw)


def test_the_flow_starts_the_policy_server_for_rl_and_stops_it(tiny_model_dir, smollm2_tokenizer, tmp_path):
    from flows.pipeline import stage_services

    port = services.free_port()
    params = managed_params(tiny_model_dir, port)
    url = params.rl.vllm_server_base_url
    assert url == f"http://127.0.0.1:{port}"
    log = logging.getLogger("test")
    with stage_services(params, "rl", tmp_path, {"PATH": "/usr/bin:/bin"}, logger=log) as svc:
        assert svc is not None and services.probe(f"{url}/health")
        info = requests.get(f"{url}/server_info", timeout=10).json()  # dev mode on: TRL's weight sync needs it
        assert info["standin"]["cuda_visible_devices"] == "3"
        assert info["vllm_config"]["model_config"]["model"] == str(Path(tiny_model_dir).resolve())
        assert info["vllm_config"]["flags"]["tensor_parallel_size"] == "1"
        assert info["vllm_config"]["flags"]["weight_transfer_config"] == '{"backend": "nccl"}'
        [g] = VLLMServerBackend(url, smollm2_tokenizer).generate([[1, 2, 3]], max_new_tokens=3)
        assert len(g.token_ids) == 3
        children = psutil.Process(svc.pid).children(recursive=True)
    assert not services.probe(f"{url}/health")
    for p in [svc.pid, *(c.pid for c in children)]:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
    assert "Loading weights" in (tmp_path / "logs" / "vllm_server_rl.log").read_text()


def test_the_server_is_stopped_when_the_stage_fails(tiny_model_dir, tmp_path):
    from flows.pipeline import stage_services

    port = services.free_port()
    params = managed_params(tiny_model_dir, port)
    with pytest.raises(RuntimeError, match="stage failed"):
        with stage_services(params, "rl", tmp_path, {}, logger=logging.getLogger("test")) as svc:
            raise RuntimeError("stage failed")
    assert not svc.running() and not services.probe(f"http://127.0.0.1:{port}/health")


def test_only_rl_stages_that_will_run_get_a_server(tiny_model_dir, tmp_path, monkeypatch):
    import flows.pipeline as P

    params = managed_params(tiny_model_dir, services.free_port())
    log = logging.getLogger("test")
    with P.stage_services(params, "evaluate", tmp_path, {}, logger=log) as svc:
        assert svc is None
    monkeypatch.setattr(P, "stage_up_to_date", lambda workspace, stage: True)
    with P.stage_services(params, "rl", tmp_path, {}, logger=log) as svc:
        assert svc is None


def test_a_port_already_in_use_is_refused(server, tiny_model_dir, tmp_path):
    from flows.pipeline import stage_services

    port = int(server[0].rsplit(":", 1)[1])  # the module's stand-in answers there already
    params = managed_params(tiny_model_dir, port)
    with pytest.raises(services.ServiceError, match=rf"something already answers http://127.0.0.1:{port}/health"):
        with stage_services(params, "rl", tmp_path, {}, logger=logging.getLogger("test")):
            pass
