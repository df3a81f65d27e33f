"""RL for dynamic knowledge acquisition: REINFORCE++ with search-in-the-loop rollouts, on TRL's GRPOTrainer.

One optimizer step (METHOD.md A.4 / B.6):
 1. `prompts_per_step` training questions, each rolled out `num_generations` times by the agent engine
    (searchrl/agent/engine.py) through TRL's `rollout_func`: the policy writes, a query-close tag
    triggers retrieval, the documents are appended as env tokens, the policy goes on. The engine keeps
    the sampled token ids and their logprobs exactly; `env_mask` is 0 on every inserted document token,
    and TRL multiplies it into the loss mask (its `tool_mask`). On CPU the live policy generates
    (searchrl HFBackend, KV cache reused across rounds); on GPU, TRL's vLLM (`trainer.vllm_generation`,
    colocate: its in-process LLM; server: its client), weights synced by TRL before each rollout.
 2. Rewards (searchrl/rewards.py), one TRL reward function per component so each is logged on its own:
    R1-Searcher++: format (0 / -2), answer (CEM and <= 10 words), group (fewest retrievals among the
    correct rollouts); R1-Searcher stage 1: retrieval 0.5 + format 0.5; stage 2: F1 + format (0 / -2).
 3. Advantages: `reinforce_pp_baseline` (searchrl/training/advantages.py; group mean subtracted, k1 KL
    to the frozen initial policy as a per-token reward with beta, gamma = 1 returns, global whitening
    over policy tokens) handed to TRL's loss as (B, T) advantages, PPO-clip epsilon, per-sequence
    token mean (`loss_type="grpo"`); or TRL's native `grpo` estimator (k3 KL in the loss).
    One optimizer step per rollout batch (gradient accumulation over micro-batches of
    `micro_batch_size` sequences), so the ratio is 1 and the clip is inactive, as in the papers.
 4. Memorization (searchrl/training/memorization.py, R1-Searcher++ only): correct rollouts that
    searched are rewritten into internal-only paths; the accepted ones add mu * NLL to the loss. The
    set is split across the step's micro-batches, each part normalised by the token count of the
    whole set, so the accumulated gradient is exactly mu * grad L_M whatever the accumulation.

Hygiene: checkpoints every `save_steps` (model, optimizer, scheduler, RNG, trainer state) under
`checkpoint_dir/<run>-<config hash>/<phase>/`, outside the DVC output, so a killed stage resumes
from its last checkpoint and ends at the same step count; a phase that finished is not rerun.
Rollout seeds are a function of (seed, phase, step), so a resumed run draws what the original would.
A collapse guard stops a phase when the format-valid rate and the reward both fall well below the
best window so far, and the best saved checkpoint (by windowed reward) becomes the phase's model.
At start-up a synthetic rollout with a document block must come out with env_mask 0 on exactly the
document tokens, and every step checks that TRL's loss mask equals the env masks handed to it.

Several phases (`rl.phases`, R1-Searcher's stage 1 then stage 2) run one after the other, each from
the previous phase's weights with a fresh optimizer; the reference policy of every phase is the
run's initial model. Steps are numbered continuously across phases in MLflow and the logs.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from searchrl import rewards as R
from searchrl.agent.backends import Generation, HFBackend, decode, encode, eos_token_ids
from searchrl.agent.backends import _StopWatcher as StopWatcher
from searchrl.agent.engine import RolloutStats, run_rollouts
from searchrl.agent.protocols import Protocol, get_protocol
from searchrl.agent.trajectory import Segment, Trajectory
from searchrl.config import AgentCfg, Params, RewardCfg, RlCfg, RlPhaseCfg
from searchrl.data.schema import QARecord, read_qa
from searchrl.errors import ConfigError, InputError, SearchRLError
from searchrl.io import atomic_path, read_json, stable_hash, write_json
from searchrl.training import memorization as M
from searchrl.training.advantages import reinforce_pp_baseline

log = logging.getLogger(__name__)

DONE_MARKER = "phase_done.json"
FORMAT_KEY = "search/format_valid"
LOG_COLUMNS = ("step", "phase", "reward", "format_valid", "correct", "retrievals", "internal_steps",
               "answer_words", "kl", "entropy", "memorization_nll", "memorization_size", "loss",
               "tokens_per_s", "step_seconds", "questions")


class MaskingError(SearchRLError):
    """Document tokens would reach the loss: the env mask is not applied."""


# ----------------------------------------------------------------------------- rewards as TRL functions
def reward_functions(cfg: RewardCfg, group_size: int) -> list[Callable]:
    """TRL reward functions for `cfg.kind`, each named after its component (TRL logs rewards/<name>/mean).

    They read the per-rollout fields the rollout function returns (`rollout_answer`, `retrievals`,
    `format_errors`) and the dataset's gold `answers`. The group reward needs whole groups: TRL hands
    the rollouts of one question as `group_size` consecutive rows."""
    words = cfg.max_answer_words

    def fmt(format_errors, **_):
        return [R.format_reward(e, cfg.format_penalty) for e in format_errors]

    def answer(rollout_answer, answers, **_):
        return [R.answer_reward(a, g, words) for a, g in zip(rollout_answer, answers, strict=True)]

    def group(rollout_answer, answers, retrievals, **_):
        correct = [R.is_correct(a, g, words) for a, g in zip(rollout_answer, answers, strict=True)]
        out: list[float] = []
        for s in range(0, len(correct), group_size):
            out.extend(R.group_rewards(correct[s: s + group_size], retrievals[s: s + group_size],
                                       cfg.group_form, cfg.group_std, cfg.group_clip))
        return out

    def retrieval(retrievals, **_):
        return [R.retrieval_reward(n) for n in retrievals]

    def stage1_format(format_errors, **_):
        return [R.stage1_format_reward(e) for e in format_errors]

    def f1(rollout_answer, answers, **_):
        return [R.f1_reward(a, g) for a, g in zip(rollout_answer, answers, strict=True)]

    fmt.__name__ = stage1_format.__name__ = "format"  # TRL names each reward by its function's name
    if cfg.kind == "r1searcher_pp":
        return [fmt, answer, group] if cfg.group_reward else [fmt, answer]
    if cfg.kind == "r1searcher_stage1":
        return [retrieval, stage1_format]
    return [f1, fmt]


# ----------------------------------------------------------------------------- rollouts -> TRL
def rollout_output(trajs: list[Trajectory], protocol: Protocol) -> dict:
    """What TRL's rollout_func returns: exact token ids, sampling logprobs, env_mask, and the fields
    the reward functions read."""
    return {
        "prompt_ids": [list(t.prompt_ids) for t in trajs],
        "completion_ids": [t.completion_ids for t in trajs],
        "logprobs": [t.logprobs for t in trajs],
        "env_mask": [t.env_mask for t in trajs],
        "rollout_answer": [t.answer for t in trajs],
        "retrievals": [t.retrievals for t in trajs],
        "internal_steps": [t.internal_steps for t in trajs],
        "format_errors": [protocol.validate(t) for t in trajs],
    }


def check_document_masking(protocol: Protocol, tokenizer) -> None:
    """Start-up assertion: a rollout with a document block gets env_mask 0 on exactly its tokens."""
    from searchrl.retrieval.base import Hit

    _, prompt_ids = protocol.prompt_ids(tokenizer, "Where was Ada Lovelace born?")
    docs = protocol.documents_text([Hit("p1", "Ada Lovelace", "Ada Lovelace was born in London.", 1.0)])
    parts = [("model", f"{protocol.query_open}birthplace of Ada Lovelace{protocol.query_close}"),
             ("env", docs), ("model", f"{protocol.answer_open}London{protocol.answer_close}")]
    traj = Trajectory("mask-check", "Where was Ada Lovelace born?", protocol.name, "", list(prompt_ids))
    for role, text in parts:
        ids = encode(tokenizer, text)
        traj.segments.append(Segment(role, text, ids, [0.0] * len(ids) if role == "model" else None))
    out = rollout_output([traj], protocol)
    ids, mask = out["completion_ids"][0], out["env_mask"][0]
    masked = [t for t, m in zip(ids, mask, strict=True) if m == 0]
    if len(mask) != len(ids) or decode(tokenizer, masked) != docs or sum(mask) != len(ids) - len(masked):
        raise MaskingError("start-up check: the env_mask of a rollout with a document block does not cover "
                           "exactly the document tokens")


@dataclass
class RolloutSummary:
    """Per-step search behaviour, logged next to TRL's metrics."""

    retrievals: float
    internal_steps: float
    format_valid: float
    correct: float
    answer_words: float
    answered_without_search: float  # reward-hacking audit (PEERS 5.11): answers with 0 retrievals
    model_tokens: int

    @classmethod
    def of(cls, trajs: list[Trajectory], outcome: dict, correct: list[bool], stats: RolloutStats
           ) -> RolloutSummary:
        n = max(len(trajs), 1)
        answers = [t.answer for t in trajs if t.answer is not None]
        return cls(retrievals=sum(t.retrievals for t in trajs) / n,
                   internal_steps=sum(t.internal_steps for t in trajs) / n,
                   format_valid=sum(not e for e in outcome["format_errors"]) / n,
                   correct=sum(correct) / n,
                   answer_words=sum(len(a.split()) for a in answers) / max(len(answers), 1),
                   answered_without_search=sum(t.answer is not None and t.retrievals == 0 for t in trajs) / n,
                   model_tokens=stats.generated_tokens)


# ----------------------------------------------------------------------------- vLLM server adapter
class VLLMServerBackend:
    """searchrl Backend over TRL's `VLLMClient` (vllm_mode="server"): token prompts in, sampled ids and
    logprobs out. The client takes one max_tokens per call, so every prompt gets the largest budget
    and each row is cut back to its own budget (cutting an autoregressive sample is sampling with the
    smaller budget). It reports no stop reason, so the stop string is found in the decoded tail."""

    def __init__(self, client, tokenizer):
        self.client = client
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer)

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, seed=None):
        n = len(prompts)
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        extra = {"stop": list(stop) or None, "include_stop_str_in_output": True, "skip_special_tokens": False,
                 "seed": seed, "stop_token_ids": sorted(self.eos_ids)}
        out = self.client.generate(prompts=[list(p) for p in prompts], n=1, temperature=float(temperature),
                                   top_p=float(top_p), max_tokens=max(1, max(budgets)), logprobs=0,
                                   generation_kwargs=extra)
        watcher = StopWatcher(self.tokenizer, list(stop))
        res = []
        for ids, lps, budget in zip(out["completion_ids"], out["logprobs"], budgets, strict=True):
            ids, lps = list(ids)[:budget], [float(x[0]) for x in lps][:budget]
            if ids and ids[-1] in self.eos_ids:
                res.append(Generation(ids, decode(self.tokenizer, ids[:-1]), lps, "eos"))
                continue
            which = watcher.match(ids)
            finish = "stop" if which else "length"
            res.append(Generation(ids, decode(self.tokenizer, ids), lps, finish, which))
        return res


# ----------------------------------------------------------------------------- collapse guard
class CollapseGuard:
    """Stops training when, over the last `window` steps, the mean format-valid rate fell by at least
    `format_drop` AND the mean reward by at least `reward_drop`, both against the best window so far
    (best = highest mean reward)."""

    def __init__(self, window: int, format_drop: float, reward_drop: float):
        self.window, self.format_drop, self.reward_drop = window, format_drop, reward_drop
        self.history: list[tuple[int, float, float]] = []
        self.best: tuple[int, float, float] | None = None  # (last step, format mean, reward mean)

    def window_reward(self) -> float | None:
        if len(self.history) < self.window:
            return None
        return sum(r for _, _, r in self.history[-self.window:]) / self.window

    def update(self, step: int, format_valid: float, reward: float) -> str | None:
        self.history.append((step, float(format_valid), float(reward)))
        if len(self.history) < self.window:
            return None
        last = self.history[-self.window:]
        f = sum(x for _, x, _ in last) / self.window
        r = sum(x for _, _, x in last) / self.window
        if self.best is None or r > self.best[2]:
            self.best = (step, f, r)
            return None
        b_step, b_f, b_r = self.best
        if b_f - f >= self.format_drop and b_r - r >= self.reward_drop:
            return (f"training collapsed: over steps {last[0][0]}-{step} the format-valid rate fell to "
                    f"{f:.2f} and the mean reward to {r:.2f}, from {b_f:.2f} and {b_r:.2f} in the best "
                    f"window (ending at step {b_step})")
        return None


# ----------------------------------------------------------------------------- trainer
def _grpo_trainer_class():
    from trl import GRPOTrainer

    class SearchRLTrainer(GRPOTrainer):
        """GRPOTrainer with search rollouts, R1-Searcher(++) rewards, REINFORCE++ advantages and the
        memorization loss (see the module docstring)."""

        def __init__(self, *, rl_cfg: RlCfg, reward_cfg: RewardCfg, agent_cfg: AgentCfg, protocol: Protocol,
                     retriever, records: list[QARecord], ref_model, rewriter_kind: str | None,
                     teacher_backend=None, seed_base: int = 0, **kwargs):
            self.rl_cfg, self.reward_cfg, self.agent_cfg = rl_cfg, reward_cfg, agent_cfg
            self.protocol = protocol
            self.retriever = retriever
            self.records = {r.question: r for r in records}
            self.rpp_ref_model = ref_model
            self.rewriter_kind = rewriter_kind
            self.teacher_backend = teacher_backend
            self.seed_base = seed_base
            self._mem_set: list[M.MemoryExample] = []
            self._mem_tokens = 0
            self._mem_acc = [0.0, 0]
            self._rewards_per_func = None
            self._env_masks: list[list[int]] | None = None
            self._hf_backend: HFBackend | None = None
            self.rollout_started = time.perf_counter()
            self.last_summary: RolloutSummary | None = None
            self.step_questions: list[str] = []
            super().__init__(rollout_func=self._search_rollout, **kwargs)
            if ref_model is not None:  # scored like TRL's own reference model (fused LM head, temperature)
                from trl.trainer.utils import add_fused_lm_head

                add_fused_lm_head(ref_model, temperature=self.temperature,
                                  cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
            if self.accelerator.num_processes > 1:  # group reward and whitening need the whole rollout batch
                raise ConfigError("the rl stage trains in one process (more GPUs: serve vLLM on them, "
                                  "rl.vllm_mode=server)")

        # -- rollouts
        def _backend(self):
            if self.use_vllm:
                if self.vllm_mode == "colocate":
                    from searchrl.agent.backends import VLLMBackend

                    return VLLMBackend("", llm=self.vllm_generation.llm, tokenizer=self.processing_class)
                return VLLMServerBackend(self.vllm_generation.vllm_client, self.processing_class)
            if self._hf_backend is None:
                self._hf_backend = HFBackend(self.accelerator.unwrap_model(self.model), self.processing_class,
                                             batch_size=self.agent_cfg.batch_size)
            return self._hf_backend

        def _search_rollout(self, prompts: list[str], trainer) -> dict:
            G = self.num_generations
            unique = prompts[::G]
            if len(prompts) % G or any(p != unique[i // G] for i, p in enumerate(prompts)):
                raise RuntimeError("rollout_func: expected each prompt num_generations times in a row")
            missing = [q for q in unique if q not in self.records]
            if missing:
                raise RuntimeError(f"rollout_func: prompt not in the training set: {missing[0][:80]!r}")
            records = [self.records[q] for q in unique]
            self.step_questions = [r.id for r in records]
            self.rollout_started = time.perf_counter()
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            stats = RolloutStats()
            try:
                backend = self._backend()
                seed = self.seed_base + 7919 * self.state.global_step
                trajs = run_rollouts(backend, self.retriever, self.protocol, records, n=G,
                                     temperature=self.rl_cfg.temperature, top_p=self.rl_cfg.top_p,
                                     agent_cfg=self.agent_cfg, seed=seed, stats=stats)
                out = rollout_output(trajs, self.protocol)
                words = self.reward_cfg.max_answer_words
                correct = [R.is_correct(t.answer, self.records[t.question].answers, words) for t in trajs]
                self._build_memorization_set(trajs, correct, backend)
            finally:
                model.train(was_training)
            self._env_masks = out["env_mask"]
            summary = RolloutSummary.of(trajs, out, correct, stats)
            self.last_summary = summary
            m = self._metrics["train"]
            m["search/retrievals"].append(summary.retrievals)
            m["search/internal_steps"].append(summary.internal_steps)
            m["search/format_valid"].append(summary.format_valid)
            m["search/correct"].append(summary.correct)
            m["search/answer_words"].append(summary.answer_words)
            m["search/answered_without_search"].append(summary.answered_without_search)
            m["throughput/rollout_tokens_per_s"].append(stats.tokens_per_second)
            return out

        def _build_memorization_set(self, trajs, correct, backend) -> None:
            self._mem_set, self._mem_tokens, self._mem_acc = [], 0, [0.0, 0]
            if self.rewriter_kind is None:
                return
            recs = {r.id: r for r in self.records.values()}
            rewriter = M.make_rewriter(self.rewriter_kind, policy_backend=backend,
                                       teacher_backend=self.teacher_backend,
                                       max_new_tokens=self.rl_cfg.rewrite_max_tokens)
            golds = {q: r.answers for q, r in recs.items()}
            meta = {q: r.metadata for q, r in recs.items()}
            mem, counts = M.build_memorization_set(trajs, correct, golds, meta, rewriter, self.protocol,
                                                   self.processing_class, self.reward_cfg.max_answer_words)
            self._mem_set = mem
            self._mem_tokens = sum(len(e.completion_ids) for e in mem)
            self._metrics["train"]["memorization/candidates"].append(counts["candidates"])
            self._metrics["train"]["memorization/size"].append(counts["accepted"])

        # -- rewards and advantages
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._rewards_per_func = rewards
            return rewards

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:
                self._check_loss_mask(out)
                if self.rl_cfg.estimator == "reinforce_pp_baseline":
                    out["advantages"], kl = self._reinforce_pp(out)
                    self._metrics["train"]["kl"].append(kl)
            return out

        def _check_loss_mask(self, out: dict) -> None:
            if "tool_mask" not in out or self._env_masks is None:
                raise MaskingError("TRL dropped the rollout's env_mask: document tokens would be trained on")
            loss_mask = (out["completion_mask"] * out["tool_mask"]).cpu()
            for i, em in enumerate(self._env_masks):
                row = loss_mask[i, : len(em)].tolist()
                if row != em or int(loss_mask[i, len(em):].sum()) != 0:
                    raise MaskingError(f"rollout {i}: TRL's loss mask differs from the rollout's env_mask")

        def _reinforce_pp(self, out: dict) -> tuple[torch.Tensor, float]:
            weights = self.reward_weights.to(self._rewards_per_func.device)
            rewards = torch.nan_to_num(self._rewards_per_func * weights.unsqueeze(0), nan=0.0).sum(dim=1)
            mask = out["completion_mask"] * out["tool_mask"]
            old = ref = None
            if self.rl_cfg.beta > 0:
                old, ref = self._old_and_ref_logps(out)
            adv, kl = reinforce_pp_baseline(rewards.to(mask.device), mask, self.num_generations, old, ref,
                                            self.rl_cfg.beta, self.rl_cfg.advantage_clip)
            return adv.to(mask.device), kl

        def _old_and_ref_logps(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
            """log pi_old and log pi_ref of the sampled tokens, both from the trainer's own forward pass
            (TRL's old logps when it computed them). Not the sampler's logprobs: at step 1 pi_old = pi_ref
            must give a KL of exactly 0, or whitening would blow numerical noise up to unit advantages."""
            input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            width = out["completion_ids"].size(1)
            bs = self.args.per_device_train_batch_size
            logps = self._get_per_token_logps_and_entropies
            with torch.no_grad():
                old = out.get("old_per_token_logps")
                if old is None:
                    old, _, _ = logps(self.model, input_ids, attention, width, bs)
                ref, _, _ = logps(self.rpp_ref_model, input_ids, attention, width, bs)
            return old, ref

        # -- memorization loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training and self.rewriter_kind is not None:
                mem = self.memorization_loss(model)
                if mem is not None:
                    loss = loss + mem
            return loss

        def memorization_loss(self, model) -> torch.Tensor | None:
            """mu * (NLL of this micro-batch's part of the memorization set) / (tokens of the whole set):
            summed over the step's micro-batches it is mu * L_M, already scaled for accumulation."""
            parts = self.args.steps_per_generation
            k = self._step % parts
            part = M.chunk(self._mem_set, parts, k)
            out = None
            if part:
                nll, n = M.nll_sum(model, part, self.processing_class.pad_token_id)
                out = self.rl_cfg.memorization_weight * nll / max(self._mem_tokens, 1)
                self._mem_acc[0] += float(nll.detach())
                self._mem_acc[1] += n
            if k == parts - 1:
                self._metrics["train"]["memorization/nll"].append(
                    self._mem_acc[0] / self._mem_acc[1] if self._mem_acc[1] else float("nan"))
            return out

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self.model.training and "loss" in logs and self.last_summary is not None:
                seconds = time.perf_counter() - self.rollout_started  # rollout + scoring + update
                m = self._metrics["train"]
                m["throughput/step_seconds"].append(seconds)
                m["throughput/tokens_per_s"].append(self.last_summary.model_tokens / seconds)
                logs["questions"] = " ".join(self.step_questions)  # kept in log_history (checkpoints)
            super().log(logs, start_time)

    return SearchRLTrainer


# ----------------------------------------------------------------------------- logging callback
def _log_callback_class():
    from transformers import TrainerCallback

    class RlLogCallback(TrainerCallback):
        """Per step: MLflow metrics (continuous step numbers across phases), one progress line, the
        collapse guard, and which checkpoint is best (Trainer's rotation keeps it)."""

        def __init__(self, phase: str, offset: int, total_steps: int, guard: CollapseGuard,
                     mlflow_log: Callable):
            self.phase, self.offset, self.total = phase, offset, total_steps
            self.guard, self.mlflow_log = guard, mlflow_log
            self.collapse: str | None = None

        def on_train_begin(self, args, state, control, **kw):
            for entry in state.log_history:  # a resumed run: replay what the guard saw
                if "reward" in entry:
                    self.guard.update(int(entry["step"]), entry.get(FORMAT_KEY, 0.0), entry["reward"])

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return
            step = state.global_step + self.offset
            self.mlflow_log({k: v for k, v in logs.items() if isinstance(v, (int, float)) and not
                             (isinstance(v, float) and math.isnan(v))}, step)
            nan = float("nan")
            log.info("rl %s step %d/%d: reward %.3f, format-valid %.2f, correct %.2f, retrievals %.2f, "
                     "internal %.2f, memorized %d, %.1f s/step, %.1f tok/s", self.phase, step, self.total,
                     logs["reward"], logs.get(FORMAT_KEY, nan), logs.get("search/correct", nan),
                     logs.get("search/retrievals", nan), logs.get("search/internal_steps", nan),
                     int(logs.get("memorization/size", 0) or 0), logs.get("throughput/step_seconds", 0.0),
                     logs.get("throughput/tokens_per_s", 0.0))
            reason = self.guard.update(state.global_step, logs.get(FORMAT_KEY, 0.0), logs["reward"])
            window = self.guard.window_reward()
            if control.should_save and window is not None and (state.best_metric is None or
                                                                window >= state.best_metric):
                state.best_metric, state.best_global_step = window, state.global_step
            if reason is not None:
                self.collapse = reason
                control.should_training_stop = True
                log.warning("rl %s: %s; stopping", self.phase, reason)

    return RlLogCallback


# ----------------------------------------------------------------------------- data
def difficulty_labels(path: Path) -> dict[str, str]:
    if not path.exists():
        raise InputError(path, "difficulty labels not found",
                         fix="run the sample stage (dvc repro sample), or set rl.difficulty: [] to train on "
                             "every question")
    df = pd.read_parquet(path)
    for col in ("id", "difficulty"):
        if col not in df.columns:
            raise InputError(path, f"column '{col}' missing (columns: {', '.join(df.columns)})", field=col)
    return dict(zip(df["id"].astype(str), df["difficulty"].astype(str), strict=True))


def training_records(params: Params, difficulty: list[str]) -> list[QARecord]:
    """Training questions whose difficulty label is in `difficulty` ([] = all), one per question text."""
    path = Path(params.prepare.out_dir) / "train.parquet"
    if not path.exists():
        raise InputError(path, "training questions not found", fix="run the prepare stage first")
    records = read_qa(path)
    if difficulty:
        labels = difficulty_labels(Path(params.sample.out_dir) / "difficulty.parquet")
        records = [r for r in records if labels.get(r.id) in difficulty]
    unique: dict[str, QARecord] = {}
    for r in records:
        unique.setdefault(r.question, r)
    if not unique:
        raise InputError(path, f"no training question has a difficulty in {difficulty}",
                         fix="widen rl.difficulty or check data/sft/difficulty.parquet")
    return list(unique.values())


# ----------------------------------------------------------------------------- one run
@dataclass
class PhaseResult:
    name: str
    steps: int
    seconds: float
    model_dir: str
    collapse: str | None = None
    log_rows: list[dict] = field(default_factory=list)


def run_key(ablation: str | None) -> str:
    return "rl" if ablation is None else f"rl_{ablation}"


def run_name(cfg: RlCfg, ablation: str | None) -> str:
    """A readable MLflow run name that differs whenever the reward configuration differs."""
    parts = []
    for ph in cfg.run_phases():
        r = ph.reward
        if r.kind == "r1searcher_pp":
            desc = "pp" + (f"+group({r.group_form},{r.group_std},eta={r.group_clip:g})" if r.group_reward
                           else "-group")
        else:
            desc = r.kind.replace("r1searcher_", "r1s-")
        parts.append(desc if len(cfg.run_phases()) == 1 else f"{ph.name}:{desc}")
    mem = f"mem={cfg.rewriter},mu={cfg.memorization_weight:g}" if cfg.memorization else "mem=off"
    return f"{run_key(ablation)} [{' > '.join(parts)} | {mem} | {cfg.estimator}]"


def config_hash(params: Params, cfg: RlCfg) -> str:
    return stable_hash({"rl": cfg.model_dump(mode="json"), "seed": params.seed,
                        "agent": params.agent.model_dump(mode="json")})[:12]


def _grpo_args(cfg: RlCfg, phase: RlPhaseCfg, out_dir: Path, seed: int, max_tokens: int, on_gpu: bool):
    from trl import GRPOConfig

    micro_batches = cfg.num_generations * cfg.prompts_per_step // cfg.micro_batch_size
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=phase.max_steps, learning_rate=cfg.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=micro_batches,
        steps_per_generation=micro_batches, num_generations=cfg.num_generations, num_iterations=1,
        max_completion_length=max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        beta=cfg.beta if cfg.estimator == "grpo" else 0.0, epsilon=cfg.epsilon, loss_type="grpo",
        scale_rewards="group", mask_truncated_completions=False, disable_dropout=True,
        use_vllm=cfg.use_vllm, vllm_mode=cfg.vllm_mode, vllm_server_base_url=cfg.vllm_server_base_url,
        use_cpu=not on_gpu, bf16=on_gpu, gradient_checkpointing=False,
        model_init_kwargs={"dtype": "bfloat16" if on_gpu else "float32"},
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        report_to=[], disable_tqdm=True, seed=seed, data_seed=seed, remove_unused_columns=False,
        shuffle_dataset=True, log_completions=False, dataloader_num_workers=0,
    )


def make_trainer(params: Params, cfg: RlCfg, phase: RlPhaseCfg, init: str, records: list[QARecord],
                 phase_dir: Path, retriever, tokenizer, ref_model=None, teacher_backend=None, callbacks=(),
                 seed_base: int = 0):
    """The SearchRLTrainer of one phase (the start-up masking check runs first)."""
    from datasets import Dataset

    from searchrl.models import causal_lm_path

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL 1.16
    protocol = get_protocol(cfg.protocol, params.agent)
    check_document_masking(protocol, tokenizer)
    agent_cfg = params.agent.model_copy(update={"max_total_tokens": cfg.max_total_tokens or
                                                params.agent.max_total_tokens})
    on_gpu = torch.cuda.is_available() and params.policy.device != "cpu"
    args = _grpo_args(cfg, phase, phase_dir, params.seed, agent_cfg.max_total_tokens, on_gpu)
    dataset = Dataset.from_list([{"prompt": r.question, "question_id": r.id, "answers": list(r.answers)}
                                 for r in records])
    trainer = _grpo_trainer_class()(
        rl_cfg=cfg, reward_cfg=phase.reward, agent_cfg=agent_cfg, protocol=protocol, retriever=retriever,
        records=records, ref_model=ref_model,
        rewriter_kind=cfg.rewriter if cfg.memorization and phase.reward.kind == "r1searcher_pp" else None,
        teacher_backend=teacher_backend, seed_base=seed_base,
        model=causal_lm_path(init),
        reward_funcs=reward_functions(phase.reward, cfg.num_generations), args=args, train_dataset=dataset,
        processing_class=tokenizer, callbacks=list(callbacks))
    if ref_model is not None:
        ref_model.to(trainer.accelerator.device)
    return trainer


def train_phase(params: Params, cfg: RlCfg, phase: RlPhaseCfg, init: str, ref_model, phase_dir: Path,
                offset: int, total_steps: int, retriever, tokenizer, teacher_backend, mlflow_log: Callable,
                seed_base: int) -> PhaseResult:
    """Train one phase from `init` (resuming from the newest checkpoint in `phase_dir`) and save its
    model to `phase_dir/final` (the best checkpoint instead, when the collapse guard stopped it)."""
    from transformers import AutoModelForCausalLM

    from searchrl.models import torch_dtype

    final = phase_dir / "final"
    done = phase_dir / DONE_MARKER
    if done.exists() and (final / "config.json").exists():
        log.info("rl %s: already trained (%s), skipping", phase.name, final)
        info = read_json(done)
        return PhaseResult(phase.name, info["steps"], info["seconds"], str(final), info["collapse"],
                           info["rows"])

    records = training_records(params, phase.difficulty if phase.difficulty is not None else cfg.difficulty)
    guard = CollapseGuard(cfg.collapse_window, cfg.collapse_format_drop, cfg.collapse_reward_drop)
    callback = _log_callback_class()(phase.name, offset, total_steps, guard, mlflow_log)
    trainer = make_trainer(params, cfg, phase, init, records, phase_dir, retriever, tokenizer,
                           ref_model=ref_model, teacher_backend=teacher_backend, callbacks=[callback],
                           seed_base=seed_base)
    resume = last_complete_checkpoint(phase_dir)
    log.info("rl %s: %d questions, %d steps of %d prompts x %d rollouts, reward %s, estimator %s%s",
             phase.name, len(records), phase.max_steps, cfg.prompts_per_step, cfg.num_generations,
             phase.reward.kind, cfg.estimator, f", resuming from {resume}" if resume else "")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    steps = trainer.state.global_step
    with atomic_path(final) as tmp:
        if callback.collapse and trainer.state.best_model_checkpoint:
            log.warning("rl %s: keeping the best checkpoint %s (windowed reward %.3f)", phase.name,
                        trainer.state.best_model_checkpoint, trainer.state.best_metric)
            dtype = torch_dtype(trainer.args.model_init_kwargs["dtype"])
            best = AutoModelForCausalLM.from_pretrained(trainer.state.best_model_checkpoint, dtype=dtype)
            best.save_pretrained(tmp)
        else:
            trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
    rows = log_rows(trainer.state.log_history, phase.name, offset)
    write_json(done, {"steps": steps, "seconds": seconds, "collapse": callback.collapse, "rows": rows})
    return PhaseResult(phase.name, steps, seconds, str(final), callback.collapse, rows)


def last_complete_checkpoint(phase_dir: Path) -> str | None:
    """Newest checkpoint-N with its trainer_state.json (the file Trainer writes last); incomplete ones
    (a kill during a save) are removed."""
    if not phase_dir.is_dir():
        return None
    found = sorted((int(d.name.split("-")[1]), d) for d in phase_dir.glob("checkpoint-*")
                   if d.is_dir() and d.name.split("-")[1].isdigit())
    for _, d in reversed(found):
        if (d / "trainer_state.json").is_file():
            return str(d)
        log.warning("rl: removing the incomplete checkpoint %s", d)
        shutil.rmtree(d, ignore_errors=True)
    return None


def log_rows(history: list[dict], phase: str, offset: int) -> list[dict]:
    """One row per logged training step (LOG_COLUMNS) from Trainer.state.log_history."""
    keys = {"reward": "reward", "format_valid": "search/format_valid", "correct": "search/correct",
            "retrievals": "search/retrievals", "internal_steps": "search/internal_steps",
            "answer_words": "search/answer_words", "kl": "kl", "entropy": "entropy",
            "memorization_nll": "memorization/nll", "memorization_size": "memorization/size", "loss": "loss",
            "tokens_per_s": "throughput/tokens_per_s", "step_seconds": "throughput/step_seconds",
            "questions": "questions"}
    rows = []
    for entry in history:
        if "reward" not in entry:
            continue
        row = {"step": int(entry["step"]) + offset, "phase": phase}
        for col, key in keys.items():
            value = entry.get(key)
            row[col] = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
        rows.append(row)
    return rows


def train_rl(params: Params, ablation: str | None = None, mlflow_log: Callable | None = None,
             retriever=None) -> dict:
    """Train the main RL run (ablation=None) or one ablation; publish its model to cfg.out_dir and its
    log / metrics / plot to <rl.metrics_dir>/<run key>/. Returns the metrics dict. `retriever`
    defaults to the index at params.index.out_dir behind the retrieval cache."""
    from transformers import AutoModelForCausalLM

    from searchrl.models import causal_lm_path, load_tokenizer, torch_dtype
    from searchrl.retrieval.cache import CachedRetriever
    from searchrl.retrieval.index import load_index

    cfg = params.rl_config(ablation)
    key = run_key(ablation)
    mlflow_log = mlflow_log or (lambda metrics, step: None)
    root = Path(cfg.checkpoint_dir) / f"{key}-{config_hash(params, cfg)}"
    _drop_stale_roots(Path(cfg.checkpoint_dir), key, root)
    if retriever is None:
        retriever = CachedRetriever(load_index(params.index.out_dir), params.agent.cache_path)
    tokenizer = load_tokenizer(cfg.init)
    teacher = None
    if cfg.memorization and cfg.rewriter == "teacher":
        teacher = _teacher_backend(params, cfg, tokenizer)
    on_gpu = torch.cuda.is_available() and params.policy.device != "cpu"
    ref = None
    if cfg.beta > 0 and cfg.estimator == "reinforce_pp_baseline":
        ref = AutoModelForCausalLM.from_pretrained(causal_lm_path(cfg.init),
                                                   dtype=torch_dtype("bfloat16" if on_gpu else "float32"))
        ref.eval().requires_grad_(False)
    phases = cfg.run_phases()
    total = sum(p.max_steps for p in phases)
    init, offset, results = cfg.init, 0, []
    for i, phase in enumerate(phases):
        res = train_phase(params, cfg, phase, init, ref, root / phase.name, offset, total, retriever,
                          tokenizer, teacher, mlflow_log, seed_base=params.seed * 1_000_003 + 104_729 * i)
        results.append(res)
        init, offset = res.model_dir, offset + res.steps
        if res.collapse:
            log.warning("rl: %s (phase %s); later phases are not run", res.collapse, phase.name)
            break
    with atomic_path(Path(cfg.out_dir)) as tmp:
        shutil.copytree(results[-1].model_dir, tmp)
    metrics = publish_reports(Path(cfg.metrics_dir) / key, results, run_name(cfg, ablation))
    shutil.rmtree(root, ignore_errors=True)
    return metrics


def _drop_stale_roots(base: Path, key: str, keep: Path) -> None:
    """Checkpoints of an earlier configuration of this run cannot be resumed: remove them."""
    if not base.is_dir():
        return
    for d in base.iterdir():
        if d.is_dir() and d != keep and d.name.rsplit("-", 1)[0] == key:
            log.info("rl: removing checkpoints of an earlier configuration: %s", d)
            shutil.rmtree(d, ignore_errors=True)


def _teacher_backend(params: Params, cfg: RlCfg, tokenizer):
    """The sample stage's teacher (sample.teacher_*), as the memorization rewriter."""
    from searchrl.training.teacher import make_teacher_backend

    s = params.sample
    if not s.teacher_model:
        raise ConfigError("rl.rewriter=teacher: set sample.teacher_model (the teacher the sample stage uses)")
    return make_teacher_backend(s.teacher_model, student_tokenizer=tokenizer,
                                protocol=get_protocol(cfg.protocol, params.agent), policy_cfg=params.policy,
                                agent_cfg=params.agent, api=s.teacher_api,
                                served_model=s.teacher_served_model, api_key_env=s.teacher_api_key_env,
                                concurrency=s.teacher_concurrency, timeout_s=s.teacher_timeout_s)


def publish_reports(out: Path, results: list[PhaseResult], name: str) -> dict:
    rows = [r for res in results for r in res.log_rows]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "log.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(LOG_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    steps = sum(r.steps for r in results)
    seconds = sum(r.seconds for r in results)
    step_seconds = [float(r["step_seconds"]) for r in rows if r["step_seconds"] != ""]
    tail = rows[-min(len(rows), 5):] if rows else []

    def mean(col: str) -> float | None:
        vals = [float(r[col]) for r in tail if r[col] != ""]
        return round(sum(vals) / len(vals), 4) if vals else None

    metrics = {"run": name, "steps": steps, "seconds": round(seconds, 1),
               "steps_per_hour": round(3600 * len(step_seconds) / sum(step_seconds), 2) if step_seconds
               else None,
               "collapsed": next((r.collapse for r in results if r.collapse), None),
               "last5": {c: mean(c) for c in ("reward", "format_valid", "correct", "retrievals",
                                              "internal_steps", "memorization_size", "kl")}}
    write_json(out / "metrics.json", metrics)
    if rows:
        from searchrl.training.curves import plot_curves

        plot_curves({name: rows}, out / "curves.png")
    return metrics
