"""Training-correctness guards of the RL stage (issue 5/11), on the tiny random llama with the real
SmolLM2 tokenizer: truncated rollouts, dynamic sampling, loss aggregation, token-in/token-out, the
train/inference logprob mismatch, importance-sampling settings, retrieval retries, the empty-
memorization warning, and no checkpoints deleted before the trainer is built."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_rl import PASSAGES, RECORDS, _trainer, make_params  # noqa: E402

from searchrl.agent.engine import run_rollouts  # noqa: E402
from searchrl.agent.fakes import KeywordRetriever, ScriptedBackend  # noqa: E402
from searchrl.agent.protocols import get_protocol  # noqa: E402
from searchrl.agent.trajectory import Segment, Trajectory  # noqa: E402
from searchrl.config import AgentCfg  # noqa: E402
from searchrl.retrieval.retry import RetrievalError, RetryingRetriever  # noqa: E402
from searchrl.training import rl as RL  # noqa: E402


class FlakyRetriever:
    """Raises ConnectionError on a seeded `rate` of calls, else answers like the keyword retriever."""

    def __init__(self, inner, rate: float, seed: int = 0, always: bool = False):
        self.inner, self.rate, self.rng, self.always = inner, rate, random.Random(seed), always
        self.manifest_hash = inner.manifest_hash
        self.calls = self.raised = 0

    def search(self, queries, k):
        self.calls += 1
        if self.always or self.rng.random() < self.rate:
            self.raised += 1
            raise ConnectionError("connection reset by peer")
        return self.inner.search(queries, k)


def run(params, retriever=None):
    logged: list[tuple[int, dict]] = []
    metrics = RL.train_rl(params, retriever=retriever or KeywordRetriever(PASSAGES),
                          mlflow_log=lambda m, step: logged.append((step, m)))
    return metrics, logged


# ----------------------------------------------------------------------------- 6. retrieval failures
def test_retrieval_failing_on_a_fifth_of_calls_loses_no_rollout(smollm2_tokenizer):
    pp = get_protocol("r1searcher_pp")
    scripts = {f"Where was person number {i} born?": ["<external>Talo Vesk birthplace</external>",
                                                       "<external>Mira Sol employer</external>",
                                                       "<answer>Peru</answer>"] for i in range(8)}
    flaky = FlakyRetriever(KeywordRetriever(PASSAGES), rate=0.2, seed=3)
    retriever = RetryingRetriever(flaky, retries=5, backoff_s=0.0, name="data/index")
    cfg = AgentCfg(continuous_batching=False)
    trajs = []
    for question in scripts:  # 8 batches x 2 retrieval rounds = 16 retrieval calls
        trajs += run_rollouts(ScriptedBackend(smollm2_tokenizer, scripts, pp.query_close), retriever, pp,
                              [question], n=2, agent_cfg=cfg)
    assert len(trajs) == 16 and all(t.answer == "Peru" and t.retrievals == 2 for t in trajs)
    assert flaky.raised > 0 and retriever.retries == flaky.raised and retriever.failures == 0


def test_retrieval_that_keeps_failing_names_the_index_and_the_query():
    sleeps: list[float] = []
    retriever = RetryingRetriever(FlakyRetriever(KeywordRetriever(PASSAGES), 0.0, always=True), retries=3,
                                  backoff_s=0.5, name="runs/smoke/data/index", sleep=sleeps.append, seed=0)
    with pytest.raises(RetrievalError, match=r"failed 4 times on index runs/smoke/data/index: query 'where was "
                                             r"Talo Vesk born' \(\+1 more in the batch\): ConnectionError"):
        retriever.search(["where was Talo Vesk born", "Mira Sol"], 3)
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2]  # exponential backoff
    assert retriever.retries == 3 and retriever.failures == 1


def test_rl_run_with_a_flaky_retriever_completes_and_counts_retries(tmp_path, tiny_model_dir):
    params = make_params(tmp_path, tiny_model_dir, max_steps=2, beta=0.0, memorization=False)
    flaky = FlakyRetriever(KeywordRetriever(PASSAGES), rate=0.2, seed=1)
    retriever = RetryingRetriever(flaky, retries=6, backoff_s=0.0, name="test-index")
    metrics, logged = run(params, retriever)
    assert metrics["steps"] == 2
    assert sum(m["search/retrieval_retries"] for _, m in logged) == retriever.retries == flaky.raised


# ----------------------------------------------------------------------------- 7. truncated rollouts
def _traj(finish: str) -> Trajectory:
    t = Trajectory("q", "Q?", "r1searcher_pp", "", [1, 2], finish_reason=finish)
    t.segments = [Segment("model", "a", [5, 6], [0.0, 0.0]), Segment("env", "d", [7], None),
                  Segment("model", "b", [8], [0.0])]
    return t


def test_mask_truncated_zeroes_exactly_the_rollouts_ended_on_a_length_cap():
    pp = get_protocol("r1searcher_pp")
    trajs = [_traj("answered"), _traj("length"), _traj("max_retrievals")]
    assert RL.rollout_output(trajs, pp)["env_mask"] == [[1, 1, 0, 1]] * 3
    assert RL.rollout_output(trajs, pp, mask_truncated=True)["env_mask"] == [[1, 1, 0, 1], [0, 0, 0, 0],
                                                                             [1, 1, 0, 1]]


def test_truncation_rate_is_logged_and_masked_rollouts_leave_the_loss(tmp_path, tiny_model_dir):
    # a 12-token budget: the random policy runs out of tokens in most rollouts
    params = make_params(tmp_path, tiny_model_dir, max_steps=1, beta=0.0, memorization=False,
                         mask_truncated=True, max_total_tokens=12)
    trainer = _trainer(tmp_path, tiny_model_dir, beta=0.0, memorization=False, mask_truncated=True,
                       max_total_tokens=12)
    assert params.rl.mask_truncated
    trainer.model.train()
    inputs = [{"prompt": r.question, "question_id": r.id, "answers": list(r.answers)}
              for r in RECORDS[:2] for _ in range(2)]
    out = trainer._generate_and_score_completions(inputs)
    truncated = trainer._metrics["train"]["search/truncated"][-1]
    assert truncated > 0
    loss_mask = out["completion_mask"] * out["tool_mask"]
    rows_in_loss = int((loss_mask.sum(dim=1) > 0).sum())
    assert rows_in_loss == round(4 * (1 - truncated))
    assert out["advantages"][loss_mask == 0].abs().max().item() == 0.0


# ----------------------------------------------------------------------------- 8. dynamic sampling
def test_dynamic_sampling_replaces_flat_groups_by_informative_new_questions(tmp_path, tiny_model_dir):
    trainer = _trainer(tmp_path, tiny_model_dir, beta=0.0, memorization=False, dynamic_sampling=True,
                       dynamic_sampling_max_draws=2)
    G = trainer.num_generations
    informative = {"q1": False, "q2": True, "q3": True, "q4": False}
    drawn: list[list[str]] = []
    real = trainer._rollout

    def fake(records, seed, stats):
        drawn.append([r.id for r in records])
        batch = real(records, seed, stats)
        batch.informative = [informative[r.id] for r in records]
        return batch

    trainer._rollout = fake
    inputs = [{"prompt": r.question, "question_id": r.id, "answers": list(r.answers)}
              for r in (RECORDS[0], RECORDS[1]) for _ in range(G)]
    trainer.model.eval()
    rows = trainer._draw_step(inputs)
    kept = [rows[i]["question_id"] for i in range(0, len(rows), G)]
    # q1 is flat; new questions are drawn (q3 informative, q4 flat; at most 2 draws) until one replaces it
    assert drawn[0] == ["q1", "q2"] and sorted(sum(drawn[1:], [])) in (["q3"], ["q3", "q4"])
    assert kept == ["q2", "q3"]
    m = trainer._metrics["train"]
    assert m["search/informative_fraction"][-1] == 0.5
    assert m["search/informative_fraction_kept"][-1] == 1.0
    assert m["search/extra_questions"][-1] == len(sum(drawn[1:], []))
    # TRL's rollout function gets exactly these rollouts, in this order
    out = trainer._search_rollout([r["prompt"] for r in rows], trainer)
    assert len(out["completion_ids"]) == len(rows)


def test_dynamic_sampling_run_logs_the_informative_fraction(tmp_path, tiny_model_dir):
    params = make_params(tmp_path, tiny_model_dir, max_steps=1, beta=0.0, memorization=False,
                         dynamic_sampling=True)
    _, logged = run(params)
    assert 0.0 <= logged[0][1]["search/informative_fraction"] <= 1.0
    assert "search/extra_questions" in logged[0][1]


# ----------------------------------------------------------------------------- 9. loss aggregation
@pytest.mark.parametrize("how", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum"])
def test_loss_aggregation_is_the_documented_formula(tmp_path, tiny_model_dir, how):
    trainer = _trainer(tmp_path, tiny_model_dir, beta=0.0, loss_aggregation=how)
    trainer.model.train()
    g = torch.Generator().manual_seed(0)
    B, P, T = 2, 4, 6
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 1, 0, 0]])  # 6 and 2 policy tokens
    adv = torch.randn(B, T, generator=g)
    inputs = {"prompt_ids": torch.randint(10, 1000, (B, P), generator=g),
              "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": torch.randint(10, 1000, (B, T), generator=g),
              "completion_mask": torch.ones(B, T, dtype=torch.long), "tool_mask": mask,
              "advantages": adv, "num_items_in_batch": mask.sum() * trainer.args.steps_per_generation}
    steps = trainer.args.steps_per_generation  # micro-batches accumulated into one optimizer step
    trainer.current_gradient_accumulation_steps = steps
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs).item()  # this micro-batch's share of the step
    per_token = -adv * mask  # ratio 1 (old logps = current): the surrogate is -A per token
    if how == "seq_mean_token_mean":  # mean over the step's sequences of each one's token mean
        expected = (per_token.sum(1) / mask.sum(1)).sum() / (B * steps)
    elif how == "token_mean":  # one mean over every policy token of the whole step
        expected = per_token.sum() / (mask.sum() * steps)
    else:  # mean over the step's sequences of each one's token sum
        expected = per_token.sum(1).sum() / (B * steps)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------- 10. token-in, token-out
def test_token_ids_the_loss_sees_must_be_the_rollouts(tmp_path, tiny_model_dir):
    trainer = _trainer(tmp_path, tiny_model_dir, beta=0.0)
    trainer._rollout_ids = [([1, 2, 3], [10, 11, 12]), ([4, 5], [13, 14])]
    trainer.step_questions = ["q1"]
    out = {"prompt_ids": torch.tensor([[1, 2, 3], [0, 4, 5]]), "prompt_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
           "completion_ids": torch.tensor([[10, 11, 12], [13, 14, 0]]),
           "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    trainer._check_token_ids(out)
    bad = dict(out, completion_ids=torch.tensor([[10, 11, 12], [13, 99, 0]]))
    with pytest.raises(RL.TokenMismatchError, match=r"rollout 1 \(q1\): the completion ids .* position 1 \(99 != 14\)"):
        trainer._check_token_ids(bad)
    short = dict(out, prompt_mask=torch.tensor([[0, 1, 1], [0, 1, 1]]))  # a prompt token dropped
    with pytest.raises(RL.TokenMismatchError, match=r"rollout 0 \(q1\): the prompt ids .* position 0"):
        trainer._check_token_ids(short)


def test_every_step_of_a_real_run_passes_the_token_check(tmp_path, tiny_model_dir, monkeypatch):
    checked: list[int] = []
    cls = RL._grpo_trainer_class()
    original = cls._check_token_ids

    def spy(self, out):
        original(self, out)
        checked.append(out["completion_ids"].size(0))

    monkeypatch.setattr(RL, "_grpo_trainer_class", lambda: type("Spy", (cls,), {"_check_token_ids": spy}))
    params = make_params(tmp_path, tiny_model_dir, max_steps=2, beta=0.0, memorization=False)
    run(params)
    assert checked == [4, 4]


# ----------------------------------------------------------------------------- 3. mismatch and IS settings
def test_logprob_mismatch_is_logged_on_cpu_and_small(tmp_path, tiny_model_dir):
    params = make_params(tmp_path, tiny_model_dir, max_steps=1, beta=0.0, memorization=False)
    _, logged = run(params)
    m = logged[0][1]
    assert 0.0 <= m["sampling/logp_mismatch/mean"] <= m["sampling/logp_mismatch/max"] < 1e-3


def test_importance_sampling_is_an_explicit_setting_off_by_default(tmp_path, tiny_model_dir):
    cfg = make_params(tmp_path, tiny_model_dir).rl
    phase = cfg.run_phases()[0]
    args = RL._grpo_args(cfg, phase, tmp_path, 0, 64, on_gpu=False)
    assert args.vllm_importance_sampling_correction is False  # TRL's own default is True
    tis = cfg.model_copy(update={"importance_sampling": "token_truncate", "importance_sampling_cap": 2.0})
    args = RL._grpo_args(tis, phase, tmp_path, 0, 64, on_gpu=False)
    assert args.vllm_importance_sampling_correction is True
    assert args.vllm_importance_sampling_mode == "token_truncate"
    assert args.vllm_importance_sampling_clip_max == 2.0


# ----------------------------------------------------------------------------- 2. memorization doing nothing
def test_memorization_that_stays_empty_warns_loudly(tmp_path, tiny_model_dir, caplog):
    trainer = _trainer(tmp_path, tiny_model_dir, beta=0.0, memorization_warn_steps=2)
    trainer.rewriter_kind = "oracle"
    no_hops = [t for t in (_traj("answered"),)]  # its record has no hop chain: the oracle cannot rewrite it
    with caplog.at_level(logging.WARNING, logger="searchrl.training.rl"):
        for _ in range(2):
            trainer._build_memorization_set(no_hops, [True], None)
    assert "empty for 2 steps" in caplog.text and "the memorization loss is doing nothing" in caplog.text


# ----------------------------------------------------------------------------- 5. nothing deleted early
def test_a_configuration_whose_trainer_fails_keeps_earlier_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    params = make_params(tmp_path, tiny_model_dir, max_steps=1, beta=0.0, memorization=False)
    stale = tmp_path / "ckpt" / "rl-0123456789ab" / "rl" / "checkpoint-1"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text('{"global_step": 1}')

    def broken(*args, **kwargs):
        raise ValueError("bad setting")

    monkeypatch.setattr(RL, "make_trainer", broken)
    with pytest.raises(ValueError, match="bad setting"):
        run(params)
    assert (stale / "trainer_state.json").is_file()


# ----------------------------------------------------------------------------- LoRA (one-GPU layout)
def test_lora_rl_trains_adapters_against_the_frozen_base_and_publishes_a_merged_model(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    import safetensors.torch
    from ddp_child import ParityBackend  # groups with right and wrong answers: a signal to learn from

    golds = {r.question: r.answers[0] for r in RECORDS}
    monkeypatch.setattr(RL, "HFBackend", lambda model, tok, batch_size: ParityBackend(tok, golds, 2))
    params = make_params(tmp_path, tiny_model_dir, max_steps=2, beta=0.1, use_lora=True, lora_r=4, lr=1e-2,
                         max_total_tokens=256)
    metrics, logged = run(params)
    assert metrics["steps"] == 2
    assert logged[0][1]["kl"] == 0.0  # step 1: adapters start at zero, policy == base
    out = tmp_path / "models" / "rl"
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    merged = safetensors.torch.load_file(out / "model.safetensors")
    base = safetensors.torch.load_file(tiny_model_dir / "model.safetensors")
    assert set(merged) == set(base)  # a plain model, adapters merged into it
    assert any(not torch.equal(merged[k], base[k]) for k in base)
