"""Masked SFT: the loss mask is the trajectory's model-token mask (golden tests on real tokenizers),
a tiny llama's training loss goes down, an interrupted run resumes exactly, LoRA merges on save."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from searchrl.agent.backends import decode, encode
from searchrl.agent.engine import run_rollouts
from searchrl.agent.fakes import KeywordRetriever, ScriptedBackend
from searchrl.agent.protocols import get_protocol
from searchrl.agent.trajectory import Segment, Trajectory
from searchrl.config import AgentCfg, SftCfg
from searchrl.errors import InputError, SearchRLError
from searchrl.models import embedded_path, load_tokenizer
from searchrl.training import sft
from searchrl.training.sampling import tokenizer_fingerprint

PP = get_protocol("r1searcher_pp")
R1 = get_protocol("r1searcher")
SR1 = get_protocol("search_r1")
TC = get_protocol("tool_call")  # on a tokenizer with tests/chat_templates.py's tool template (none has one)
ALL = [PP, R1, SR1, TC]
IDS = ["pp", "r1", "search_r1", "tool_call"]
Q = "What is the capital of the country where Zorblat Holdings was founded?"
MODEL_1 = "<external>Zorblat Holdings founded</external>"
ENV = "\n<document>\n(1) Zorblat Holdings: Zorblat Holdings was founded in 1901 in France.\n</document>\n"
MODEL_2 = "Zorblat Holdings was founded in France.\n<internal>The capital of France is Paris.</internal>\n" \
          "<answer>Paris</answer>"


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2's byte-level BPE without a chat template (the agent tests' second tokenizer)."""
    from tests.integration.test_rollout_real_tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def minilm():
    """The second real tokenizer: WordPiece (BERT), no chat template, lower-cases: nothing like BPE."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_path("all-minilm-l6-v2")))


def hand_trajectory(tok, protocol=PP, texts=((("model", MODEL_1), ("env", ENV), ("model", MODEL_2)))) -> Trajectory:
    prompt_text, prompt_ids = protocol.prompt_ids(tok, Q)
    segs = [Segment(role, text, encode(tok, text), [0.0] * len(encode(tok, text)) if role == "model" else None)
            for role, text in texts]
    return Trajectory("q0", Q, protocol.name, prompt_text, prompt_ids, segs, answer="Paris", finish_reason="answered",
                      retrievals=1, internal_steps=1, queries=["Zorblat Holdings founded"], retrieved_ids=[["p-zo"]])


def completion_mask(example: dict, n_prompt: int) -> list[int]:
    return [int(lbl != sft.IGNORE) for lbl in example["labels"][n_prompt:]]


# ----------------------------------------------------------------------------- masking (golden)
def tokenizer_for(which: str, protocol, request):
    from tests.chat_templates import with_tool_template

    tok = request.getfixturevalue(which)
    return with_tool_template(tok) if protocol is TC else tok


@pytest.mark.parametrize("which", ["smol", "gpt2", "minilm"])
@pytest.mark.parametrize("protocol", ALL, ids=IDS)
def test_labels_mask_equals_env_mask(which, protocol, request):
    tok = tokenizer_for(which, protocol, request)
    traj = hand_trajectory(tok, protocol)
    ex = sft.sft_example(traj)
    n = len(traj.prompt_ids)
    assert ex["input_ids"] == traj.prompt_ids + traj.completion_ids
    assert ex["labels"][:n] == [sft.IGNORE] * n
    assert completion_mask(ex, n) == traj.env_mask
    assert [t for t, lbl in zip(ex["input_ids"], ex["labels"], strict=True) if lbl != sft.IGNORE] == \
        encode(tok, MODEL_1) + encode(tok, MODEL_2)
    # re-tokenising (teacher / oracle path) with the same tokenizer: identical ids and mask
    again = sft.student_trajectory(traj, tok, protocol)
    assert sft.sft_example(again) == ex
    assert sum(completion_mask(ex, n)) == len(encode(tok, MODEL_1)) + len(encode(tok, MODEL_2))
    assert len(traj.env_mask) - sum(traj.env_mask) == len(encode(tok, ENV))


R1_MODEL_1 = " I need the country.<|begin_of_query|>Zorblat Holdings founded<|end_of_query|>"
R1_MODEL_2 = "It was founded in France, whose capital is Paris.</think>\n<answer>Paris</answer>"
SCRIPTS = {
    "r1searcher_pp": [MODEL_1, MODEL_2],
    "r1searcher": [R1_MODEL_1, R1_MODEL_2],
    "search_r1": ["<think>I need the country.</think>\n<search> Zorblat Holdings founded </search>",
                  "<think>France, whose capital is Paris.</think>\n<answer> Paris </answer>"],
    "tool_call": ['I need the country.\n<tool_call>\n{"name": "search", "arguments": {"query": "Zorblat Holdings '
                  'founded"}}\n</tool_call>', "France, whose capital is Paris.\n<answer>Paris</answer>"],
}


@pytest.mark.parametrize("which", ["smol", "gpt2"])
@pytest.mark.parametrize("protocol", ALL, ids=IDS)
def test_masked_tokens_are_exactly_the_inserted_documents(which, protocol, request):
    """A real rollout (agent loop, a real retriever over passages, the tokenizer's own ids): the
    unmasked tokens decode to the model's text, the masked ones to the inserted document blocks."""
    tok = tokenizer_for(which, protocol, request)
    ret = KeywordRetriever([("p-zo", "Zorblat Holdings", "Zorblat Holdings was founded in 1901 in France."),
                            ("p-fr", "France", "France is a country in Europe. Its capital city is Paris.")])
    script = SCRIPTS[protocol.name]
    backend = ScriptedBackend(tok, {Q: script}, protocol.query_close)
    traj = run_rollouts(backend, ret, protocol, [("q0", Q)], agent_cfg=AgentCfg(top_k=2))[0]
    assert [s.role for s in traj.segments] == ["model", "env", "model"] and traj.finish_reason == "answered"
    ex = sft.sft_example(traj)
    n = len(traj.prompt_ids)
    mask = completion_mask(ex, n)
    assert mask == traj.env_mask
    kept = [t for t, m in zip(ex["input_ids"][n:], mask, strict=True) if m]
    dropped = [t for t, m in zip(ex["input_ids"][n:], mask, strict=True) if not m]
    assert decode(tok, kept) == traj.model_text == "".join(script)
    assert decode(tok, dropped) == traj.segments[1].text and protocol.doc_open in traj.segments[1].text
    assert not protocol.validate(traj)


def test_policy_ids_are_kept_exactly_and_others_retokenised(smol):
    """A policy may sample a non-canonical tokenisation ("Par" + "is"); its ids are reused verbatim
    when the tokenizer matches; a teacher's trajectory (or another vocabulary) is re-tokenised."""
    traj = hand_trajectory(smol)
    odd = [i for ch in "<answer>Paris</answer>" for i in encode(smol, ch)]
    last = traj.segments[2]
    traj.segments[2] = Segment("model", last.text, encode(smol, last.text[: -len("<answer>Paris</answer>")]) + odd,
                               None)
    assert decode(smol, traj.segments[2].token_ids) == last.text and traj.segments[2].token_ids != last.token_ids
    fp = tokenizer_fingerprint(smol)
    rows = [(traj, {"sampler": "policy", "tokenizer": fp}), (traj, {"sampler": "teacher", "tokenizer": ""}),
            (traj, {"sampler": "policy", "tokenizer": "another-vocabulary"})]
    examples, counts = sft.build_examples(rows, smol, fp, max_length=4096)
    assert counts["exact_ids"] == 1 and counts["retokenised"] == 2
    assert examples[0]["input_ids"][len(traj.prompt_ids):] == traj.completion_ids
    canonical = traj.prompt_ids + encode(smol, MODEL_1) + encode(smol, ENV) + encode(smol, MODEL_2)
    assert examples[1]["input_ids"] == examples[2]["input_ids"] == canonical
    for ex in examples:
        n = len(traj.prompt_ids)
        env_len = len(encode(smol, ENV))
        mask = completion_mask(ex, n)
        assert mask.count(0) == env_len and mask[len(encode(smol, MODEL_1))] == 0


def test_too_long_examples_are_dropped_not_truncated(smol):
    traj = hand_trajectory(smol)
    examples, counts = sft.build_examples([(traj, {"sampler": "oracle"})], smol, "", max_length=len(traj.prompt_ids) + 5)
    assert examples == [] and counts["too_long"] == 1


def test_read_trajectories_names_a_bad_line(tmp_path, smol):
    good = {**hand_trajectory(smol).to_dict(), "sampler": "oracle", "tokenizer": ""}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question": "no fields"}) + "\n")
    with pytest.raises(InputError, match=r"t.jsonl, line 2"):
        sft.read_trajectories(path)
    path.write_text(json.dumps(good) + "\n")
    (traj, extras), = sft.read_trajectories(path)
    assert traj.segments[1].role == "env" and extras == {"sampler": "oracle", "tokenizer": ""}


# ----------------------------------------------------------------------------- training (tiny llama)
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=smol.bos_token_id, eos_token_id=smol.eos_token_id, pad_token_id=smol.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    smol.save_pretrained(path)
    return path


def load_tiny(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def examples_for(tok, n: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        city = ["Paris", "Berlin", "Rome", "Madrid"][i % 4]
        texts = (("model", f"<external>city number {i}</external>"), ("env", f"\n<document>\n(1) doc {i}\n</document>\n"),
                 ("model", f"<answer>{city}</answer>"))
        out.append(sft.sft_example(hand_trajectory(tok, PP, texts)))
    return out


def cfg_for(tmp_path: Path, **kw) -> SftCfg:
    base = dict(epochs=2, batch_size=4, micro_batch_size=2, lr=5e-3, warmup_ratio=0.0, lr_scheduler="constant",
                logging_steps=1, save_steps=2, checkpoint_dir=str(tmp_path / "ckpt"), out_dir=str(tmp_path / "out"))
    return SftCfg(**{**base, **kw})


def test_tiny_sft_lowers_training_loss(tiny_dir, smol, tmp_path):
    cfg = cfg_for(tmp_path, epochs=6)
    summary = sft.train_sft(cfg, examples_for(smol), load_tiny(tiny_dir), smol, cfg.out_dir, device="cpu")
    curve = sft.loss_curve(summary["log_history"])
    assert summary["steps"] == 12 and len(curve) == 12
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]
    out = Path(cfg.out_dir)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    reloaded = load_tiny(out)
    assert reloaded.config.num_hidden_layers == 2
    sft.plot_loss(curve, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupt(f"interrupted at step {step}")

    return Stop()


def test_interrupted_run_resumes_from_the_last_checkpoint(tiny_dir, smol, tmp_path):
    examples = examples_for(smol)
    straight = cfg_for(tmp_path / "a")
    ref = sft.train_sft(straight, examples, load_tiny(tiny_dir), smol, straight.out_dir, device="cpu")
    assert ref["steps"] == 4 and ref["resumed_from_step"] == 0

    cfg = cfg_for(tmp_path / "b")
    with pytest.raises(Interrupt):
        sft.train_sft(cfg, examples, load_tiny(tiny_dir), smol, cfg.out_dir, device="cpu", callbacks=[interrupt_at(3)])
    ckpt = Path(cfg.checkpoint_dir) / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "scheduler.pt").exists() and not Path(cfg.out_dir).exists()
    saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert all(s["step"] == 2 for s in saved_opt["state"].values())  # Adam state after two updates

    resumed = sft.train_sft(cfg, examples, load_tiny(tiny_dir), smol, cfg.out_dir, device="cpu")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert [h["step"] for h in resumed["log_history"] if "loss" in h] == [1, 2, 3, 4]
    a, b = load_tiny(straight.out_dir).state_dict(), load_tiny(cfg.out_dir).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)

    # a different dataset does not resume another run's checkpoints
    sft.prepare_checkpoint_dir(Path(cfg.checkpoint_dir), "another-run")
    assert not ckpt.exists()


def test_lora_adapters_are_merged_on_save(tiny_dir, smol, tmp_path):
    cfg = cfg_for(tmp_path, use_lora=True, lora_r=4, lora_alpha=8, epochs=1, lr=1e-2)
    sft.train_sft(cfg, examples_for(smol), load_tiny(tiny_dir), smol, cfg.out_dir, device="cpu")
    out = Path(cfg.out_dir)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    merged, base = load_tiny(out).state_dict(), load_tiny(tiny_dir).state_dict()
    assert set(merged) == set(base)
    assert any(not torch.equal(merged[k], base[k]) for k in base if "proj" in k)


def test_no_examples_is_a_clear_error(tiny_dir, smol, tmp_path):
    cfg = cfg_for(tmp_path)
    with pytest.raises(SearchRLError, match="no training examples"):
        sft.train_sft(cfg, [], load_tiny(tiny_dir), smol, cfg.out_dir, device="cpu")


def test_resume_skips_a_checkpoint_half_written_when_the_stage_was_killed(tiny_dir, smol, tmp_path):
    examples = examples_for(smol)
    straight = cfg_for(tmp_path / "a")
    sft.train_sft(straight, examples, load_tiny(tiny_dir), smol, straight.out_dir, device="cpu")
    cfg = cfg_for(tmp_path / "b")
    with pytest.raises(Interrupt):
        sft.train_sft(cfg, examples, load_tiny(tiny_dir), smol, cfg.out_dir, device="cpu", callbacks=[interrupt_at(3)])
    ckpt_dir = Path(cfg.checkpoint_dir)
    # killed while saving checkpoint-4: its weights are on disk, its trainer state is not (or is cut short)
    half = ckpt_dir / "checkpoint-4"
    half.mkdir()
    shutil.copy(ckpt_dir / "checkpoint-2" / "model.safetensors", half / "model.safetensors")
    (half / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    resumed = sft.train_sft(cfg, examples, load_tiny(tiny_dir), smol, cfg.out_dir, device="cpu")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    a, b = load_tiny(straight.out_dir).state_dict(), load_tiny(cfg.out_dir).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_a_setting_that_fails_keeps_the_interrupted_runs_checkpoints(tiny_dir, smol, tmp_path, monkeypatch):
    examples = examples_for(smol)
    cfg = cfg_for(tmp_path)
    with pytest.raises(Interrupt):
        sft.train_sft(cfg, examples, load_tiny(tiny_dir), smol, cfg.out_dir, device="cpu", callbacks=[interrupt_at(3)])
    assert (Path(cfg.checkpoint_dir) / "checkpoint-2" / "trainer_state.json").is_file()
    import trl

    def broken(*args, **kwargs):
        raise ValueError("bad setting")

    monkeypatch.setattr(trl, "SFTTrainer", broken)
    changed = cfg.model_copy(update={"lr": 1e-3})  # another run's fingerprint: its checkpoints are stale
    with pytest.raises(ValueError, match="bad setting"):
        sft.train_sft(changed, examples, load_tiny(tiny_dir), smol, changed.out_dir, device="cpu")
    assert (Path(cfg.checkpoint_dir) / "checkpoint-2" / "trainer_state.json").is_file()


def test_lr_scheduler_typo_fails_when_params_are_loaded():
    from searchrl.config import validate
    from searchrl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sft\.lr_scheduler.*got 'cosin'"):
        validate({"sft": {"lr_scheduler": "cosin"}})
    from typing import get_args

    from transformers.trainer_utils import SchedulerType

    from searchrl.config import LrScheduler

    assert set(get_args(LrScheduler)) == {s.value for s in SchedulerType}


def _enumerated_settings(model, prefix=()):
    """(dotted key, allowed values, is a list) of every Literal-typed setting (or list of Literals)
    reachable from `model` through nested sections."""
    from typing import Literal, get_args, get_origin

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann, key = field.annotation, (*prefix, name)
        is_list = get_origin(ann) is list and bool(get_args(ann))
        if is_list:
            ann = get_args(ann)[0]
        if get_origin(ann) is Literal:
            yield ".".join(key), get_args(ann), is_list
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _enumerated_settings(ann, key)


def test_every_enumerated_setting_rejects_a_typo_when_params_are_loaded():
    """Issue 5/11 item 5, the whole kind: a misspelt value of any enumerated setting stops at load time,
    naming the key and the value, before a stage can delete anything."""
    from searchrl.config import Params, validate
    from searchrl.errors import ConfigError

    settings = list(_enumerated_settings(Params))
    assert len(settings) >= 25 and "sft.lr_scheduler" in {key for key, _, _ in settings}
    for key, allowed, is_list in settings:
        typo = str(allowed[0]) + "x"
        *path, leaf = key.split(".")
        raw: dict = {}
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = [typo] if is_list else typo
        with pytest.raises(ConfigError, match=re.escape(leaf)):
            validate(raw)
