"""The served-policy backend's request / reply mapping, its config keys, the managed server's command
line, and the RL stage's GRPOConfig in server mode — no server, no vLLM."""

from __future__ import annotations

import sys

import pytest

from searchrl.agent.vllm_server import (
    VLLMServerBackend,
    VLLMServerError,
    completion_request,
    parse_choice,
    serve_command,
    serve_env,
)
from searchrl.config import VllmServerCfg, load_params
from searchrl.errors import ConfigError


@pytest.fixture(scope="module")
def tok():
    from searchrl.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def choice(ids, finish="length", stop_reason=None, lps=None, tokens=None):
    lps = [-0.5] * len(ids) if lps is None else lps
    tokens = [f"token_id:{t}" for t in ids] if tokens is None else tokens
    return {"token_ids": ids, "finish_reason": finish, "stop_reason": stop_reason, "text": "ignored",
            "logprobs": {"tokens": tokens, "token_logprobs": lps, "top_logprobs": []}}


# ----------------------------------------------------------------------------- request / reply
def test_request_asks_for_token_ids_sampled_logprobs_stops_and_the_row_seed():
    body = completion_request([1, 2, 3], 7, model="m", stop=["</external>"], eos_ids=[2, 0], temperature=0.7,
                              top_p=0.9, seed=11)
    assert body == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 7, "n": 1, "temperature": 0.7, "top_p": 0.9,
                    "stop": ["</external>"], "stop_token_ids": [0, 2], "include_stop_str_in_output": True,
                    "skip_special_tokens": False, "logprobs": 0, "return_token_ids": True,
                    "return_tokens_as_token_ids": True, "seed": 11}
    greedy = completion_request([1], 4, model="m", stop=[], eos_ids=[], temperature=0.0, top_p=0.5, seed=None)
    assert greedy["top_p"] == 1.0 and "seed" not in greedy


def test_reply_ending_on_a_stop_string_keeps_every_sampled_token(tok):
    ids = tok.encode(" a query</external> and", add_special_tokens=False)
    g = parse_choice(choice(ids, "stop", "</external>"), tok, {tok.eos_token_id})
    assert (g.token_ids, g.finish, g.stop) == (ids, "stop", "</external>")
    assert g.text == " a query</external> and"  # decode of the ids, not the server's cut text
    assert g.logprobs == [-0.5] * len(ids)


def test_reply_ending_on_eos_or_a_stop_token_id_is_eos_without_it_in_the_text(tok):
    eos = tok.eos_token_id
    ids = [*tok.encode(" done", add_special_tokens=False), eos]
    for stop_reason in (None, eos):
        g = parse_choice(choice(ids, "stop", stop_reason), tok, {eos})
        assert (g.token_ids, g.finish, g.stop, g.text) == (ids, "eos", None, " done")


def test_reply_ending_on_the_budget_is_length(tok):
    ids = tok.encode(" abc", add_special_tokens=False)
    g = parse_choice(choice(ids, "length"), tok, {tok.eos_token_id})
    assert (g.finish, g.stop) == ("length", None)


@pytest.mark.parametrize("bad, message", [
    (choice([5, 6], lps=[-1.0]), "2 token ids but 1 logprobs"),
    (choice([5, 6], tokens=["token_id:5", "token_id:7"]), "other tokens than token_ids (from position 1"),
    (choice([5, 6], tokens=["hello", "world"]), "other tokens than token_ids (from position 0"),
    ({"text": "no ids", "finish_reason": "length", "logprobs": None}, "without token_ids"),
    (choice([5], "abort"), "finish_reason 'abort'"),
])
def test_replies_that_break_the_contract_are_refused(tok, bad, message):
    with pytest.raises(VLLMServerError, match="^vLLM server at http://h:1: .*" + message.replace("(", r"\(")):
        parse_choice(bad, tok, {tok.eos_token_id}, where="vLLM server at http://h:1")


# ----------------------------------------------------------------------------- construction
def test_backend_takes_a_url_or_trl_client(tok):
    b = VLLMServerBackend("http://127.0.0.1:8000/v1/", tok)
    assert b.base_url == "http://127.0.0.1:8000" and b.model == ""

    class TrlClient:  # TRL's VLLMClient exposes these two (and holds the NCCL weight-sync group)
        base_url = "http://10.0.0.7:8001"
        model = "models/sft"

    b = VLLMServerBackend(TrlClient(), tok)
    assert (b.base_url, b.model) == ("http://10.0.0.7:8001", "models/sft")
    with pytest.raises(ConfigError, match="not an http"):
        VLLMServerBackend("127.0.0.1:8000", tok)


def test_backend_from_config(tok):
    params = load_params(overrides=["agent.backend=vllm_server", "agent.vllm_server_url=http://gpu7:8000",
                                    "agent.vllm_server_model=qwen", "agent.vllm_server_concurrency=256"])
    b = VLLMServerBackend.from_config(params.agent, tok, policy_model="models/rl")
    assert (b.base_url, b.model, b.concurrency) == ("http://gpu7:8000", "qwen", 256)
    params = load_params(overrides=["agent.backend=vllm_server", "agent.vllm_server_url=http://gpu7:8000"])
    b = VLLMServerBackend.from_config(params.agent, tok, policy_model="models/rl")
    assert b.model == "models/rl"  # the model the stage would load: a server serving another one is refused


def test_zero_budget_rows_send_no_request(tok):
    b = VLLMServerBackend("http://127.0.0.1:9", tok)  # nothing listens there
    gens = b.generate([[1, 2], [3]], max_new_tokens=[0, 0])
    assert [(g.token_ids, g.finish) for g in gens] == [([], "length"), ([], "length")]
    assert b.generate([], max_new_tokens=5) == []


# ----------------------------------------------------------------------------- config
def test_backend_vllm_server_needs_a_url():
    with pytest.raises(ConfigError, match=r"agent.vllm_server_url: backend vllm_server needs the server's http"):
        load_params(overrides=["agent.backend=vllm_server"])


def managed(*extra):
    return load_params(overrides=["vllm_server.managed=true", "rl.use_vllm=true", "rl.vllm_mode=server",
                                  "vllm_server.port=8123", *extra])


def test_managed_server_fills_the_rl_base_url_of_every_run():
    params = managed("rl_ablations={no_mem: {memorization: false}}", "evaluate.methods=[direct]")
    assert params.rl.vllm_server_base_url == "http://127.0.0.1:8123"
    assert params.rl_config("no_mem").vllm_server_base_url == "http://127.0.0.1:8123"


@pytest.mark.parametrize("extra, message", [
    (["rl.vllm_mode=colocate"], "vllm_server.managed: no RL run uses a vLLM server"),
    (["rl.vllm_server_base_url=http://elsewhere:9000"], "is not the managed server's http://127.0.0.1:8123"),
    (["vllm_server.gpus='0'", "policy.device=cuda"], "vllm_server.gpus: GPU 0 also runs a training process"),
    (["vllm_server.gpus='7'", "vllm_server.tensor_parallel_size=2"], "tensor_parallel_size (2) needs that many"),
    (["vllm_server.gpus='gpu7'"], "is not a list of GPU indices"),
])
def test_managed_server_mistakes_are_one_line(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        managed(*extra)


def test_grpo_config_in_server_mode_points_trl_at_the_server(tmp_path):
    """The RL stage hands TRL use_vllm / vllm_mode=server / the base URL (no client is built here)."""
    from searchrl.training import rl as RL

    params = managed()
    cfg = params.rl_config()
    phase = cfg.run_phases()[0]
    args = RL._grpo_args(cfg, phase, tmp_path, 0, 64, on_gpu=False)
    assert (args.use_vllm, args.vllm_mode, args.vllm_server_base_url) == (True, "server", "http://127.0.0.1:8123")
    assert args.vllm_importance_sampling_correction is False  # rl.importance_sampling: off (the papers)


# ----------------------------------------------------------------------------- the managed server's command
def test_serve_command_fills_placeholders_and_keeps_json(monkeypatch):
    cfg = VllmServerCfg(command=["{python}", "-m", "srv", "serve", "{model}", "--port", "{port}", "--tensor-parallel-size",
                                 "{tensor_parallel_size}", "--dtype", "{dtype}", "--weight-transfer-config",
                                 '{"backend": "nccl"}'], extra_args=["--max-model-len", "9216"], port=8011,
                        tensor_parallel_size=2, gpus="6,7")
    cmd = serve_command(cfg, "/models/sft", "bfloat16")
    assert cmd == [sys.executable, "-m", "srv", "serve", "/models/sft", "--port", "8011", "--tensor-parallel-size", "2",
                   "--dtype", "bfloat16", "--weight-transfer-config", '{"backend": "nccl"}', "--max-model-len", "9216"]
    assert serve_env(cfg) == {"VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "6,7"}


def test_default_command_is_vllm_serve_with_trls_flags(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda exe, path=None: f"/opt/bin/{exe}")
    cmd = serve_command(VllmServerCfg(), "Qwen/Qwen2.5-7B-Instruct", "bfloat16")
    assert cmd[:3] == ["/opt/bin/vllm", "serve", "Qwen/Qwen2.5-7B-Instruct"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags == {"--host": "127.0.0.1", "--port": "8000", "--tensor-parallel-size": "1",
                     "--gpu-memory-utilization": "0.9", "--dtype": "bfloat16",
                     "--weight-transfer-config": '{"backend": "nccl"}', "--logprobs-mode": "processed_logprobs",
                     "--max-logprobs": "-1"}


def test_a_missing_vllm_is_a_config_error(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda exe, path=None: None)
    with pytest.raises(ConfigError, match=r"vllm_server.command: 'vllm' is not installed here \(pip install"):
        serve_command(VllmServerCfg(), "m")


# ----------------------------------------------------------------------------- the paper presets
@pytest.mark.shared_data
def test_paper_presets_describe_their_gpu_layouts(shared_data):
    """paper.yaml: 7 ZeRO-3 training ranks on GPUs 0-6, the vLLM server on GPU 7, batches that split over
    the ranks; paper_lora.yaml: one process, vLLM colocated, LoRA SFT. (The KILT corpus is not needed here.)"""
    from searchrl.config import project_root

    root = project_root()
    no_kilt = ["prepare.jsonl.corpus=[]"]
    paper = load_params(root / "params.yaml", preset=root / "configs" / "paper.yaml", overrides=no_kilt)
    assert (paper.launcher.processes, paper.launcher.config_file) == (7, "configs/accelerate/zero3.yaml")
    assert (root / paper.launcher.config_file).is_file()
    assert paper.vllm_server.managed and paper.vllm_server.gpu_ids() == [7]
    for name in (None, *paper.rl_ablations):
        cfg = paper.rl_config(name)
        assert (cfg.use_vllm, cfg.vllm_mode, cfg.vllm_server_base_url) == (True, "server", "http://127.0.0.1:8000")
        assert cfg.prompts_per_step % 7 == 0
    assert paper.sft.batch_size % (paper.sft.micro_batch_size * 7) == 0
    lora = load_params(root / "params.yaml", preset=root / "configs" / "paper_lora.yaml", overrides=no_kilt)
    assert lora.launcher.processes == 1 and not lora.vllm_server.managed
    assert (lora.rl.use_vllm, lora.rl.vllm_mode, lora.sft.use_lora) == (True, "colocate", True)
    # R1-Searcher's stage-2 questions carry no supporting facts: the presets memorize with a rewriter that
    # needs none (issue 5/11 item 2), and loading them passed the start-up check that the rewriter fits
    for p in (paper, lora):
        assert p.rl.rewriter == "policy" and p.rl.memorization

