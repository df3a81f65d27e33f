"""The RL stage on a tiny random llama with the real SmolLM2 tokenizer, on CPU: a 3-step run, the
document mask in the loss, the memorization loss under gradient accumulation, resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from searchrl.agent.fakes import KeywordRetriever
from searchrl.config import validate
from searchrl.data.schema import QARecord, qa_frame
from searchrl.models import load_tokenizer
from searchrl.training import memorization as M
from searchrl.training import rl as RL

HOPS = [{"subject": "Talo Vesk", "relation": "born_in", "object": "Peru", "source": "external",
         "passage_id": "p1"}]
RECORDS = [
    QARecord("q1", "kw", "train", "In which country was Talo Vesk born?", ["Peru"], {"hops": HOPS}),
    QARecord("q2", "kw", "train", "Which company does Mira Sol work for?", ["Bantex Labs"],
             {"hops": [{"subject": "Mira Sol", "relation": "works_for", "object": "Bantex Labs",
                        "source": "external", "passage_id": "p2"}]}),
    QARecord("q3", "kw", "train", "What is the capital of France?", ["Paris"],
             {"hops": [{"subject": "France", "relation": "capital", "object": "Paris", "source": "internal",
                        "passage_id": "p3"}]}),
    QARecord("q4", "kw", "train", "When was Bantex Labs founded?", ["1987"], {}),
]
PASSAGES = [("p1", "Talo Vesk", "Talo Vesk is a chemist who was born in Peru."),
            ("p2", "Mira Sol", "Mira Sol works for Bantex Labs."),
            ("p3", "France", "France is a country in Europe. Its capital city is Paris."),
            ("p4", "Bantex Labs", "Bantex Labs was founded in 1987.")]


def make_params(tmp: Path, model_dir: Path, sample: dict | None = None, **rl):
    (tmp / "prepared").mkdir(parents=True, exist_ok=True)
    qa_frame(RECORDS).to_parquet(tmp / "prepared" / "train.parquet")
    raw = {
        "seed": 0,
        "agent": {"max_segment_tokens": 8, "max_total_tokens": 20, "batch_size": 8, "max_retrievals": 2},
        "prepare": {"out_dir": str(tmp / "prepared")},
        "sample": {"out_dir": str(tmp / "sft"), **(sample or {})},
        "rl": {"init": str(model_dir), "max_steps": 3, "num_generations": 2, "prompts_per_step": 2,
               "micro_batch_size": 2, "difficulty": [], "save_steps": 1, "beta": 0.1, "lr": 1e-3,
               "out_dir": str(tmp / "models" / "rl"), "metrics_dir": str(tmp / "reports"),
               "checkpoint_dir": str(tmp / "ckpt"), **rl},
    }
    return validate(raw)


def run(params, logged: list) -> dict:
    retriever = KeywordRetriever(PASSAGES)
    return RL.train_rl(params, retriever=retriever, mlflow_log=lambda m, step: logged.append((step, m)))


def test_three_step_run_on_cpu(tmp_path, tiny_model_dir):
    params = make_params(tmp_path, tiny_model_dir)
    logged: list[tuple[int, dict]] = []
    metrics = run(params, logged)
    assert metrics["steps"] == 3 and metrics["collapsed"] is None and metrics["steps_per_hour"] > 0
    assert [s for s, _ in logged] == [1, 2, 3]
    assert logged[0][1]["kl"] == 0.0  # step 1: pi_old = pi_ref, scored by the same forward pass
    for key in ("reward", "rewards/format/mean", "rewards/answer/mean", "rewards/group/mean", "kl", "entropy",
                "search/retrievals", "search/internal_steps", "search/format_valid", "search/answer_words",
                "memorization/size", "throughput/tokens_per_s"):
        assert key in logged[0][1], key
    rows = list(csv.DictReader(open(tmp_path / "reports" / "rl" / "log.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert (tmp_path / "reports" / "rl" / "curves.png").stat().st_size > 0
    out = tmp_path / "models" / "rl"
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not any((tmp_path / "ckpt").iterdir())  # checkpoints are dropped once the model is published


def test_two_phase_r1searcher_run(tmp_path, tiny_model_dir):
    phases = [{"name": "stage1", "reward": {"kind": "r1searcher_stage1"}, "max_steps": 1},
              {"name": "stage2", "reward": {"kind": "r1searcher_stage2"}, "max_steps": 2}]
    params = make_params(tmp_path, tiny_model_dir, protocol="r1searcher", memorization=False, beta=0.0,
                         phases=phases)
    logged: list[tuple[int, dict]] = []
    metrics = run(params, logged)
    assert metrics["steps"] == 3
    assert [s for s, _ in logged] == [1, 2, 3]  # continuous across phases
    assert "rewards/retrieval/mean" in logged[0][1] and "rewards/f1/mean" in logged[1][1]
    rows = list(csv.DictReader(open(tmp_path / "reports" / "rl" / "log.csv", encoding="utf-8")))
    assert [(r["step"], r["phase"]) for r in rows] == [("1", "stage1"), ("2", "stage2"), ("3", "stage2")]


def test_grpo_estimator_with_trl_reference_model(tmp_path, tiny_model_dir):
    params = make_params(tmp_path, tiny_model_dir, estimator="grpo", beta=0.1, max_steps=1,
                         memorization=False)
    logged: list[tuple[int, dict]] = []
    metrics = run(params, logged)
    assert metrics["steps"] == 1 and "kl" in logged[0][1]  # TRL's k3 KL against its own reference model


def test_teacher_rewriter_from_the_sample_section(tmp_path, tiny_model_dir):
    params = make_params(tmp_path, tiny_model_dir, sample={"teacher_model": str(tiny_model_dir)},  # an HF dir
                         max_steps=1, rewriter="teacher", beta=0.0)
    logged: list[tuple[int, dict]] = []
    assert run(params, logged)["steps"] == 1
    assert "memorization/size" in logged[0][1]


def test_collapse_guard_stops_and_keeps_the_best_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    # what the guard sees per step (format-valid rate, reward); window 2: the best window ends at step 2,
    # the window of steps 2-3 has fallen by 0.5 (format) and 1.5 (reward)
    seen = {1: (1.0, 1.0), 2: (1.0, 1.0), 3: (0.0, -2.0), 4: (0.0, -2.0), 5: (0.0, -2.0)}
    original = RL.CollapseGuard.update
    monkeypatch.setattr(RL.CollapseGuard, "update", lambda g, step, f, r: original(g, step, *seen[step]))
    from transformers import AutoModelForCausalLM

    loaded: list[str] = []
    load = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded.append(str(path))
        return load(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    params = make_params(tmp_path, tiny_model_dir, max_steps=5, collapse_window=2, beta=0.0,
                         memorization=False)
    cfg = params.rl
    from searchrl.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    res = RL.train_phase(params, cfg, cfg.run_phases()[0], str(tiny_model_dir), None, tmp_path / "phase",
                         0, 5, KeywordRetriever(PASSAGES), tok, None, lambda m, s: None, 0)
    assert res.steps == 3 and "format-valid rate fell to 0.50" in res.collapse
    assert loaded[-1] == str(tmp_path / "phase" / "checkpoint-2")  # the best checkpoint, not checkpoint-3
    assert (tmp_path / "phase" / "checkpoint-3").is_dir()  # rotation kept the latest and the best
    final = safetensors.torch.load_file(Path(res.model_dir) / "model.safetensors")
    best = safetensors.torch.load_file(tmp_path / "phase" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in best)


def _trainer(tmp_path, tiny_model_dir, **rl):
    params = make_params(tmp_path, tiny_model_dir, **rl)
    cfg = params.rl
    phase = cfg.run_phases()[0]
    trainer = RL.make_trainer(params, cfg, phase, str(tiny_model_dir), RECORDS, tmp_path / "ckpt",
                              KeywordRetriever(PASSAGES), load_tokenizer(str(tiny_model_dir)))
    trainer.current_gradient_accumulation_steps = cfg.prompts_per_step
    return trainer


def test_loss_has_zero_gradient_through_document_tokens(tmp_path, tiny_model_dir):
    trainer = _trainer(tmp_path, tiny_model_dir, beta=0.0)
    trainer.model.train()
    g = torch.Generator().manual_seed(0)
    B, P, T = 2, 5, 6
    tool_mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 1]])  # document tokens at 2-3 and 1-2
    inputs = {"prompt_ids": torch.randint(10, 1000, (B, P), generator=g),
              "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": torch.randint(10, 1000, (B, T), generator=g),
              "completion_mask": torch.ones(B, T, dtype=torch.long), "tool_mask": tool_mask,
              "advantages": torch.randn(B, T, generator=g), "num_items_in_batch": tool_mask.sum()}
    captured = {}
    original = trainer._get_per_token_logps_and_entropies

    def spy(*args, **kwargs):
        logps, entropies, aux = original(*args, **kwargs)
        logps.retain_grad()
        captured["logps"] = logps
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = spy
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grad = captured["logps"].grad
    assert grad[tool_mask == 0].abs().max().item() == 0.0
    assert grad[tool_mask == 1].abs().min().item() > 0.0
    # advantages on document positions do not matter at all
    trainer._get_per_token_logps_and_entropies = original
    on_docs = torch.where(tool_mask.bool(), inputs["advantages"], torch.full((B, T), 99.0))
    inputs2 = dict(inputs, advantages=on_docs)
    with torch.no_grad():
        assert trainer._compute_loss(trainer.model, inputs2).item() == pytest.approx(loss.item())


def test_missing_env_mask_is_caught(tmp_path, tiny_model_dir):
    trainer = _trainer(tmp_path, tiny_model_dir, beta=0.0)
    trainer._env_masks = [[1, 0, 1]]
    out = {"completion_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(RL.MaskingError, match="env_mask"):
        trainer._check_loss_mask(out)
    out["tool_mask"] = torch.ones(1, 3, dtype=torch.long)  # TRL ignored the zeros
    with pytest.raises(RL.MaskingError, match="differs"):
        trainer._check_loss_mask(out)
    out["tool_mask"] = torch.tensor([[1, 0, 1]])
    trainer._check_loss_mask(out)


def test_memorization_loss_is_mu_nll_over_the_accumulated_step(tmp_path, tiny_model_dir):
    trainer = _trainer(tmp_path, tiny_model_dir, beta=0.0, memorization_weight=0.1)
    tok, pp = trainer.processing_class, trainer.protocol
    examples = []
    for r in RECORDS[:3]:
        text = M.oracle_rewrite(M.RewriteItem(r.id, r.question, r.answers[0], [], r.metadata))
        _, prompt = pp.prompt_ids(tok, r.question)
        completion = list(tok.encode(text, add_special_tokens=False))
        examples.append(M.MemoryExample(r.id, text, list(prompt), completion))
    trainer._mem_set, trainer._mem_tokens = examples, sum(len(e.completion_ids) for e in examples)
    model = trainer.model
    model.zero_grad()
    for k in range(trainer.args.steps_per_generation):  # 2 micro-batches: 2 examples, then 1
        trainer._step = k
        trainer.memorization_loss(model).backward()
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nll, n = M.nll_sum(model, examples, tok.pad_token_id)
    assert n == trainer._mem_tokens
    (0.1 * nll / n).backward()
    for a, b in zip(accumulated, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert trainer._metrics["train"]["memorization/nll"][-1] == pytest.approx(nll.item() / n, rel=1e-5)


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from integration.test_rl import make_params, PASSAGES
    from pathlib import Path
    from searchrl.agent.fakes import KeywordRetriever
    from searchrl.stage import setup_logging
    from searchrl.training import rl as RL

    setup_logging()
    slow = RL.run_rollouts
    def run_rollouts(*a, **k):  # slow steps down so the parent can kill the run between checkpoints
        time.sleep(0.4)
        return slow(*a, **k)
    RL.run_rollouts = run_rollouts
    params = make_params(Path({tmp!r}), Path({model!r}), max_steps=4, save_steps=2)
    print("METRICS", RL.train_rl(params, retriever=KeywordRetriever(PASSAGES))["steps"], flush=True)
""")


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_step_count(tmp_path, tiny_model_dir):
    script = tmp_path / "child.py"
    tests = str(Path(__file__).parents[1])
    script.write_text(CHILD.format(tests=tests, tmp=str(tmp_path), model=str(tiny_model_dir)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "ckpt").glob("rl-*/rl/checkpoint-2/trainer_state.json"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.05)
    assert ckpt is not None, proc.communicate()[0].decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "models" / "rl").exists()
    state = json.loads(ckpt.read_text())
    assert state["global_step"] == 2
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "METRICS 4" in done.stdout
    assert "resuming from" in done.stderr
    rows = list(csv.DictReader(open(tmp_path / "reports" / "rl" / "log.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
