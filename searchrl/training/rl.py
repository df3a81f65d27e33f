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
    over policy tokens) handed to TRL's loss as (B, T) advantages, PPO-clip epsilon; or TRL's native
    `grpo` estimator (k3 KL in the loss). Either way a group without reward variance gets exactly zero
    advantage (advantages.py). One optimizer step per rollout batch (gradient accumulation over
    micro-batches of `micro_batch_size` sequences), so the ratio pi/pi_old is 1 and the clip is
    inactive, as in the papers. `rl.loss_aggregation` picks how per-token losses are averaged: the
    papers' sequence mean of token means (TRL `grpo`, default), a token mean over the whole step (TRL
    `dapo`) or a sequence mean of token sums (TRL `dr_grpo` times max_completion_length).
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
document tokens, and every step checks that TRL's loss mask equals the env masks handed to it and that
the token ids the loss sees are exactly the prompt ids, the sampled model ids and the inserted env ids
of each rollout (token-in, token-out; the first difference stops the run, whatever the backend).

Guards logged every step (MLflow and log.csv): `search/truncated` (rollouts ended on a length cap;
`rl.mask_truncated` drops them from the loss), `search/informative_fraction` (groups whose rewards
differ; `rl.dynamic_sampling` replaces the others by newly drawn questions, DAPO-style),
`sampling/logp_mismatch/{mean,max}` (|log pi_train - log pi_rollout| over policy tokens: HF rollouts
should be ~1e-5, vLLM's larger; `rl.importance_sampling` sets TRL's correction of vLLM rollouts,
off by default as in the papers), `search/retrieval_retries` (searchrl/retrieval/retry.py), and a loud
warning when memorization is on but its set stays empty for `rl.memorization_warn_steps` steps.

Several phases (`rl.phases`, R1-Searcher's stage 1 then stage 2) run one after the other, each from
the previous phase's weights with a fresh optimizer; the reference policy of every phase is the
run's initial model. Steps are numbered continuously across phases in MLflow and the logs.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from searchrl import distributed as dist
from searchrl import rewards as R
from searchrl.agent.backends import HFBackend
from searchrl.agent.engine import RolloutStats, run_rollouts
from searchrl.agent.protocols import Protocol, get_protocol
from searchrl.agent.vllm_server import VLLMServerBackend  # the trainer's rollout backend in vllm_mode server
from searchrl.config import AgentCfg, Params, RewardCfg, RlCfg, RlPhaseCfg
from searchrl.data.schema import QARecord, read_qa
from searchrl.errors import ConfigError, InputError
from searchrl.io import atomic_path, read_json, stable_hash, write_json
from searchrl.training import memorization as M
from searchrl.training.advantages import flat_groups, group_normalized, reinforce_pp_baseline
from searchrl.training.checkpoints import last_complete_checkpoint
from searchrl.training.rl_steps import (
    CollapseGuard,
    MaskingError,
    RolloutSummary,
    StepRollouts,
    TokenMismatchError,
    check_document_masking,
    first_difference,
    group_reward_share,
    reward_functions,
    rollout_output,
    total_rewards,
)

log = logging.getLogger(__name__)

DONE_MARKER = "phase_done.json"
FORMAT_KEY = "search/format_valid"
LOG_COLUMNS = ("step", "phase", "reward", "format_valid", "correct", "retrievals", "internal_steps",
               "answer_words", "kl", "entropy", "memorization_nll", "memorization_size", "loss",
               "truncated", "informative_fraction", "logp_mismatch_max", "retrieval_retries",
               "group_reward", "group_reward_groups",
               "tokens_per_s", "step_seconds", "questions")


# TRL loss types for rl.loss_aggregation, and the factor that turns TRL's loss into ours
# (TRL's dr_grpo divides the token sums by max_completion_length as well: undone by the factor)
LOSS_TYPES = {"seq_mean_token_mean": "grpo", "token_mean": "dapo", "seq_mean_token_sum": "dr_grpo"}


# ----------------------------------------------------------------------------- trainer
def _epoch_repeat_sampler_class():
    from trl.trainer.utils import RepeatSampler

    class EpochRepeatSampler(RepeatSampler):
        """RepeatSampler reseeded from (seed, epoch) at every set_epoch (the Trainer calls it each epoch)."""

        @classmethod
        def from_trl(cls, sampler: RepeatSampler) -> EpochRepeatSampler:
            out = cls.__new__(cls)
            out.__dict__.update(sampler.__dict__)
            out.set_epoch(0)
            return out

        def set_epoch(self, epoch: int) -> None:
            if self.shuffle:
                self.generator = torch.Generator()
                self.generator.manual_seed((self.seed or 0) * 1_000_003 + int(epoch))

    return EpochRepeatSampler


def _grpo_trainer_class():
    from trl import GRPOTrainer

    EpochRepeatSampler = _epoch_repeat_sampler_class()

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
            self._mem_history: list[tuple[int, int]] = []  # (set tokens over all ranks, candidates) per step
            self._rewards_per_func = None
            self._env_masks: list[list[int]] | None = None
            self._rollout_ids: list[tuple[list[int], list[int]]] | None = None
            self._pending: tuple[list[str], dict] | None = None
            self._retries_seen = 0
            self._hf_backend: HFBackend | None = None
            self._server_backend: VLLMServerBackend | None = None
            self.rollout_started = time.perf_counter()
            self.last_summary: RolloutSummary | None = None
            self.step_questions: list[str] = []
            super().__init__(rollout_func=self._search_rollout, **kwargs)
            if ref_model is not None:  # scored like TRL's own reference model (fused LM head, temperature)
                from trl.trainer.utils import add_fused_lm_head

                add_fused_lm_head(ref_model, temperature=self.temperature,
                                  cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)

        def _get_train_sampler(self, dataset=None):
            """TRL's RepeatSampler with a permutation that is a function of (seed, epoch): a run resumed
            in a later epoch draws the questions an uninterrupted run would (TRL's sampler seeds one
            generator once, so after a resume its later epochs were permuted differently)."""
            return EpochRepeatSampler.from_trl(super()._get_train_sampler(dataset))

        # -- rollouts
        def _backend(self):
            if self.use_vllm:
                if self.vllm_mode == "colocate":
                    from searchrl.agent.backends import VLLMBackend

                    return VLLMBackend("", llm=self.vllm_generation.llm, tokenizer=self.processing_class)
                if self._server_backend is None:  # every rank talks HTTP; TRL's client (rank 0) syncs weights
                    url = self.args.vllm_server_base_url or \
                        f"http://{self.args.vllm_server_host}:{self.args.vllm_server_port}"
                    self._server_backend = VLLMServerBackend(url, self.processing_class)
                return self._server_backend
            if self._hf_backend is None:
                self._hf_backend = HFBackend(self.accelerator.unwrap_model(self.model), self.processing_class,
                                             batch_size=self.agent_cfg.batch_size)
            return self._hf_backend

        def _rollout(self, records: list[QARecord], seed: int, stats: RolloutStats) -> StepRollouts:
            """num_generations rollouts of each record with the live policy; rewards screened per group."""
            G = self.num_generations
            with self._generation_weights():
                trajs = run_rollouts(self._backend(), self.retriever, self.protocol, records, n=G,
                                     temperature=self.rl_cfg.temperature, top_p=self.rl_cfg.top_p,
                                     agent_cfg=self.agent_cfg, seed=seed, stats=stats)
            out = rollout_output(trajs, self.protocol, self.rl_cfg.mask_truncated)
            answers = [list(r.answers) for r in records for _ in range(G)]
            totals = total_rewards(self.reward_funcs, self.reward_weights.tolist(), out, answers)
            informative = (~flat_groups(torch.tensor(totals, dtype=torch.float64), G)).tolist()
            return StepRollouts(list(records), trajs, out, informative)

        def _generation_weights(self):
            """Full weights for the HF backend while it generates: under ZeRO-3 / FSDP each rank holds a
            shard, gathered for the rollouts (TRL's unwrap_model_for_generation); a no-op otherwise."""
            import contextlib

            if self.use_vllm or self.accelerator.num_processes == 1:
                return contextlib.nullcontext()
            from accelerate.utils import DistributedType
            from trl.models import unwrap_model_for_generation

            if self.accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
                return contextlib.nullcontext()
            self._hf_backend = None  # rebuilt over the gathered module

            @contextlib.contextmanager
            def gathered():
                with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model:
                    self._hf_backend = HFBackend(model, self.processing_class, batch_size=self.agent_cfg.batch_size)
                    try:
                        yield
                    finally:
                        self._hf_backend = None

            return gathered()

        def _my_questions(self, seen: list[str], count: int) -> list[str]:
            """This rank's `count` questions: every question of the step (the distinct prompts each rank
            was handed, in rank order) cut into one contiguous block per rank, so each group of
            num_generations rollouts lives on one rank (the group reward and baseline need the whole
            group) and TRL's gathered rewards are group-major."""
            n = self.accelerator.num_processes
            everyone = list(dict.fromkeys(q for part in dist.gather_objects(seen) for q in part))
            if len(everyone) != n * count:
                raise RuntimeError(f"rl: {len(everyone)} questions this step cannot be split into {n} blocks of "
                                   f"{count} (prompts_per_step must be a multiple of the training processes)")
            r = self.accelerator.process_index
            return everyone[r * count:(r + 1) * count]

        def _draw_step(self, inputs: list[dict]) -> list[dict]:
            """Roll out the step's questions (dynamic sampling: replace groups without reward variance by
            groups of newly drawn questions, at most rl.dynamic_sampling_max_draws extra draws); the
            rollouts wait in self._pending for TRL's call to the rollout function. Returns the step's rows."""
            G = self.num_generations
            prompts = [x["prompt"] for x in inputs]
            if len(prompts) % G:
                raise RuntimeError(f"rollout_func: {len(prompts)} rows on this rank, not whole groups of {G}")
            # TRL spreads a question's copies over the ranks; each rank takes whole questions instead
            if self.accelerator.num_processes > 1:
                unique = self._my_questions(list(dict.fromkeys(prompts)), len(prompts) // G)
            else:
                unique = prompts[::G]
                if any(p != unique[i // G] for i, p in enumerate(prompts)):
                    raise RuntimeError("rollout_func: expected each prompt num_generations times in a row")
            missing = [q for q in unique if q not in self.records]
            if missing:
                raise RuntimeError(f"rollout_func: prompt not in the training set: {missing[0][:80]!r}")
            step_seed = self.seed_base + 7919 * self.state.global_step
            self.rollout_started = time.perf_counter()
            stats = RolloutStats()
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            try:
                first = self._rollout([self.records[q] for q in unique], step_seed, stats)
                batches, planned = [first], len(unique)
                if self.rl_cfg.dynamic_sampling:
                    used = set(unique)
                    rng = random.Random(step_seed + 31 * self.accelerator.process_index)
                    for draw in range(1, self.rl_cfg.dynamic_sampling_max_draws + 1):
                        need = planned - sum(sum(b.informative) for b in batches)
                        pool = [r for q, r in self.records.items() if q not in used]
                        if need <= 0 or not pool:
                            break
                        extra = rng.sample(pool, min(need, len(pool)))
                        used.update(r.question for r in extra)
                        batches.append(self._rollout(extra, step_seed + 104_729 * draw, stats))
                parts = [(b, g) for b in batches for g in range(len(b.records)) if b.informative[g]][:planned]
                parts += [(first, g) for g in range(planned) if not first.informative[g]][: planned - len(parts)]
                step = StepRollouts.select(parts, G)
                drawn = [t for b in batches for t in b.trajs]
                correct_all = [R.is_correct(t.answer, self.records[t.question].answers,
                                            self.reward_cfg.max_answer_words) for t in drawn]
                # memorization uses every correct retrieval rollout drawn this step, kept or not
                self._build_memorization_set(drawn, correct_all, self._backend())
            finally:
                model.train(was_training)
            m = self._metrics["train"]
            m["search/informative_fraction"].append(sum(first.informative) / planned)
            m["search/informative_fraction_kept"].append(sum(step.informative) / planned)
            m["search/extra_questions"].append(sum(len(b.records) for b in batches[1:]))
            self._finish_rollouts(step, stats)
            self._pending = ([r.question for r in step.records for _ in range(G)], step.out)
            template = inputs[0]
            return [{**template, "prompt": r.question, "question_id": r.id, "answers": list(r.answers)}
                    for r in step.records for _ in range(G)]

        def _finish_rollouts(self, step: StepRollouts, stats: RolloutStats) -> None:
            trajs, out = step.trajs, step.out
            words = self.reward_cfg.max_answer_words
            correct = [R.is_correct(t.answer, self.records[t.question].answers, words) for t in trajs]
            self.step_questions = [r.id for r in step.records]
            self._env_masks = out["env_mask"]
            self._rollout_ids = [(list(t.prompt_ids), t.completion_ids) for t in trajs]
            summary = RolloutSummary.of(trajs, out, correct, stats)
            self.last_summary = summary
            m = self._metrics["train"]
            m["search/group_reward_groups"].append(group_reward_share(correct, out["retrievals"],
                                                                      self.num_generations, self.reward_cfg))
            m["search/retrievals"].append(summary.retrievals)
            m["search/internal_steps"].append(summary.internal_steps)
            m["search/format_valid"].append(summary.format_valid)
            m["search/correct"].append(summary.correct)
            m["search/answer_words"].append(summary.answer_words)
            m["search/answered_without_search"].append(summary.answered_without_search)
            m["search/truncated"].append(summary.truncated)
            m["throughput/rollout_tokens_per_s"].append(stats.tokens_per_second)
            retries = int(getattr(self.retriever, "retries", 0))
            m["search/retrieval_retries"].append(retries - self._retries_seen)
            self._retries_seen = retries

        def _sync_vllm_weights(self) -> None:
            """Push this step's weights to vLLM before our rollouts (TRL syncs inside its own _generate,
            which runs after them: the rollouts would come from last step's weights)."""
            if self.use_vllm and self.state.global_step != self._last_loaded_step:
                self.vllm_generation.sync_weights()
                self._last_loaded_step = self.state.global_step

        def _search_rollout(self, prompts: list[str], trainer) -> dict:
            """TRL's rollout_func: the rollouts _draw_step made for exactly these prompts."""
            pending, self._pending = self._pending, None
            if pending is None or pending[0] != list(prompts):
                raise RuntimeError("rollout_func: called without the step's rollouts (or for other prompts)")
            return pending[1]

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
            # every rank's set counts in L_M's normaliser (DDP averages the ranks' gradients: see memorization_loss)
            local = torch.tensor(float(sum(len(e.completion_ids) for e in mem)))
            self._mem_tokens = int(dist.all_reduce(local).item()) if self.accelerator.num_processes > 1 \
                else int(local.item())
            self._metrics["train"]["memorization/candidates"].append(counts["candidates"])
            self._metrics["train"]["memorization/size"].append(counts["accepted"])
            self._mem_history.append((self._mem_tokens, counts["candidates"]))
            sizes, offered = zip(*self._mem_history, strict=True)
            n = self.rl_cfg.memorization_warn_steps
            empty_run = next((i for i, size in enumerate(reversed(sizes)) if size), len(sizes))
            if empty_run == n or (empty_run > n and empty_run % (5 * n) == 0):  # once, then now and then
                warning = M.empty_set_warning(list(sizes), list(offered), empty_run, self.rewriter_kind)
                if warning:
                    log.warning("rl: %s", warning)

        # -- rewards and advantages
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._rewards_per_func = rewards
            return rewards

        def _generate_and_score_completions(self, inputs):
            if self.model.training:
                self._sync_vllm_weights()
                inputs = self._draw_step(inputs)
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:
                self._check_loss_mask(out)
                self._check_token_ids(out)
                train_logps = self._log_logprob_mismatch(out)
                if self.rl_cfg.estimator == "reinforce_pp_baseline":
                    out["advantages"], kl = self._reinforce_pp(out, train_logps)
                    self._metrics["train"]["kl"].append(kl)
                else:  # TRL's GRPO formula, with no variance mapped to exactly no signal
                    out["advantages"] = group_normalized(self._step_rewards(), self.num_generations).to(
                        out["advantages"].device)
            return out

        def _check_loss_mask(self, out: dict) -> None:
            if "tool_mask" not in out or self._env_masks is None:
                raise MaskingError("TRL dropped the rollout's env_mask: document tokens would be trained on")
            loss_mask = (out["completion_mask"] * out["tool_mask"]).cpu()
            for i, em in enumerate(self._env_masks):
                row = loss_mask[i, : len(em)].tolist()
                if row != em or int(loss_mask[i, len(em):].sum()) != 0:
                    raise MaskingError(f"rollout {i}: TRL's loss mask differs from the rollout's env_mask")

        def _check_token_ids(self, out: dict) -> None:
            """Token-in, token-out: the ids the loss sees are exactly the prompt ids and the sampled model
            ids + inserted env ids of each rollout; the first difference stops the run."""
            if self._rollout_ids is None or len(self._rollout_ids) != out["completion_ids"].size(0):
                raise TokenMismatchError("the loss batch does not line up with the step's rollouts")
            p_ids, p_mask = out["prompt_ids"].cpu(), out["prompt_mask"].cpu().bool()
            c_ids, c_mask = out["completion_ids"].cpu(), out["completion_mask"].cpu().bool()
            for i, (prompt, completion) in enumerate(self._rollout_ids):
                for part, seen, real in (("prompt", p_ids[i][p_mask[i]].tolist(), prompt),
                                         ("completion", c_ids[i][c_mask[i]].tolist(), completion)):
                    j = first_difference(seen, real)
                    if j is not None:
                        got = seen[j] if j < len(seen) else "end"
                        want = real[j] if j < len(real) else "end"
                        raise TokenMismatchError(
                            f"rollout {i} ({self.step_questions[i // self.num_generations] if self.step_questions else '?'}): "
                            f"the {part} ids the loss sees differ from the rollout's at position {j} "
                            f"({got} != {want}); token-in, token-out is broken")

        def _train_logps(self, out: dict) -> torch.Tensor:
            """log pi_old of the sampled tokens from the trainer's own forward pass (TRL's when it made one)."""
            old = out.get("old_per_token_logps")
            if old is not None:
                return old
            input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            with torch.no_grad():
                old, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention, out["completion_ids"].size(1),
                    self.args.per_device_train_batch_size)
            return old

        def _log_logprob_mismatch(self, out: dict) -> torch.Tensor:
            """Train/inference mismatch |log pi_train - log pi_rollout| over the policy tokens (mean, max),
            logged every step whatever rl.importance_sampling says. Returns log pi_train."""
            train = self._train_logps(out)
            sampled = out.get("sampling_per_token_logps")
            if sampled is not None:
                mask = (out["completion_mask"] * out["tool_mask"]).bool()
                delta = (train - sampled).abs()[mask & ~torch.isnan(sampled)]
                m = self._metrics["train"]
                m["sampling/logp_mismatch/mean"].append(delta.mean().item() if delta.numel() else 0.0)
                m["sampling/logp_mismatch/max"].append(delta.max().item() if delta.numel() else 0.0)
            return train

        def _step_rewards(self) -> torch.Tensor:
            """This rank's scalar rewards (TRL gathers every rank's; ours are the rank's block of them)."""
            weights = self.reward_weights.to(self._rewards_per_func.device)
            total = torch.nan_to_num(self._rewards_per_func * weights.unsqueeze(0), nan=0.0).sum(dim=1)
            n = total.numel() // self.accelerator.num_processes
            r = self.accelerator.process_index
            return total[r * n:(r + 1) * n]

        def _reinforce_pp(self, out: dict, train_logps: torch.Tensor) -> tuple[torch.Tensor, float]:
            rewards = self._step_rewards()
            mask = out["completion_mask"] * out["tool_mask"]
            ref = None
            if self.rl_cfg.beta > 0:
                ref = self._ref_logps(out)
            adv, kl = reinforce_pp_baseline(rewards.to(mask.device), mask, self.num_generations, train_logps, ref,
                                            self.rl_cfg.beta, self.rl_cfg.advantage_clip,
                                            all_reduce=dist.all_reduce if self.accelerator.num_processes > 1 else None)
            return adv.to(mask.device), kl

        def _ref_logps(self, out: dict) -> torch.Tensor:
            """log pi_ref of the sampled tokens (the frozen initial policy). log pi_old is the trainer's own
            forward pass, not the sampler's logprobs: at step 1 pi_old = pi_ref must give a KL of exactly 0."""
            input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            width, bs = out["completion_ids"].size(1), self.args.per_device_train_batch_size
            with torch.no_grad():
                if self.rpp_ref_model is None:  # LoRA: the frozen base under the adapters is the reference
                    with self.accelerator.unwrap_model(self.model).disable_adapter():
                        ref, _, _ = self._get_per_token_logps_and_entropies(self.model, input_ids, attention, width, bs)
                else:
                    ref, _, _ = self._get_per_token_logps_and_entropies(self.rpp_ref_model, input_ids, attention,
                                                                        width, bs)
            return ref

        # -- loss
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            if self.rl_cfg.loss_aggregation == "seq_mean_token_sum":
                loss = loss * self.max_completion_length  # TRL's dr_grpo also divides by it
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training and self.rewriter_kind is not None:
                mem = self.memorization_loss(model)
                if mem is not None:
                    loss = loss + mem
            return loss

        def memorization_loss(self, model) -> torch.Tensor | None:
            """mu * (NLL of this micro-batch's part of the memorization set) / (tokens of the whole set, all
            ranks): summed over the step's micro-batches (and ranks) it is mu * L_M, already scaled for
            accumulation. Under several ranks the term is multiplied by their number, since DDP / ZeRO
            average the ranks' gradients instead of summing them."""
            parts = self.args.steps_per_generation
            k = self._step % parts
            part = M.chunk(self._mem_set, parts, k)
            out = None
            if part:
                nll, n = M.nll_sum(model, part, self.processing_class.pad_token_id)
                out = self.rl_cfg.memorization_weight * nll * self.accelerator.num_processes / max(self._mem_tokens, 1)
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
            for entry in state.log_history:  # a resumed run: replay what the guard saw, and what MLflow saw
                if "reward" in entry:
                    self.guard.update(int(entry["step"]), entry.get(FORMAT_KEY, 0.0), entry["reward"])
                    if state.is_world_process_zero:  # tracking skips (key, step) pairs the run already has
                        self.mlflow_log({k: v for k, v in entry.items() if isinstance(v, (int, float)) and not
                                         (isinstance(v, float) and math.isnan(v))}, int(entry["step"]) + self.offset)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return
            step = state.global_step + self.offset
            if state.is_world_process_zero:
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

    # micro-batches per optimizer step on each rank (every rank accumulates its share of the step)
    micro_batches = cfg.num_generations * cfg.prompts_per_step // (cfg.micro_batch_size * dist.world_size())
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=phase.max_steps, learning_rate=cfg.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=micro_batches,
        steps_per_generation=micro_batches, num_generations=cfg.num_generations, num_iterations=1,
        max_completion_length=max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        beta=cfg.beta if cfg.estimator == "grpo" else 0.0, epsilon=cfg.epsilon,
        loss_type=LOSS_TYPES[cfg.loss_aggregation],
        scale_rewards="group", mask_truncated_completions=False, disable_dropout=True,
        use_vllm=cfg.use_vllm, vllm_mode=cfg.vllm_mode, vllm_server_base_url=cfg.vllm_server_base_url,
        vllm_importance_sampling_correction=cfg.importance_sampling != "off",
        vllm_importance_sampling_mode=("sequence_mask" if cfg.importance_sampling == "off"
                                       else cfg.importance_sampling),
        vllm_importance_sampling_clip_max=cfg.importance_sampling_cap,
        vllm_importance_sampling_clip_min=cfg.importance_sampling_min,
        use_cpu=not on_gpu, bf16=on_gpu, gradient_checkpointing=cfg.gradient_checkpointing,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
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
        model=causal_lm_path(init), peft_config=_lora_config(cfg),
        reward_funcs=reward_functions(phase.reward, cfg.num_generations), args=args, train_dataset=dataset,
        processing_class=tokenizer, callbacks=list(callbacks))
    if ref_model is not None:
        ref_model.to(trainer.accelerator.device)
    return trainer


def _lora_config(cfg: RlCfg):
    """peft LoraConfig of rl.use_lora (None: full fine-tune)."""
    if not cfg.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _merged(path: Path, dtype) -> object:
    """The model saved at `path`, LoRA adapters merged into the base when it holds adapters."""
    from transformers import AutoModelForCausalLM

    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def train_phase(params: Params, cfg: RlCfg, phase: RlPhaseCfg, init: str, ref_model, phase_dir: Path,
                offset: int, total_steps: int, retriever, tokenizer, teacher_backend, mlflow_log: Callable,
                seed_base: int, on_trainer_built: Callable[[], None] | None = None) -> PhaseResult:
    """Train one phase from `init` (resuming from the newest complete checkpoint in `phase_dir`) and
    save its model to `phase_dir/final` (the best checkpoint instead, when the collapse guard stopped it).
    `on_trainer_built` runs once the trainer exists (every setting accepted), before training."""

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
    if on_trainer_built is not None:
        on_trainer_built()
    resume = last_complete_checkpoint(phase_dir, remove_incomplete=dist.is_main())
    log.info("rl %s: %d questions, %d steps of %d prompts x %d rollouts, reward %s, estimator %s%s",
             phase.name, len(records), phase.max_steps, cfg.prompts_per_step, cfg.num_generations,
             phase.reward.kind, cfg.estimator, f", resuming from {resume}" if resume else "")
    t0 = time.perf_counter()
    with dist.cpu_checkpoint_loading():
        trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    steps = trainer.state.global_step
    # every rank takes part in saving (ZeRO-3 / FSDP gather the shards); rank 0 writes and publishes
    partial = phase_dir / ".final.partial"
    if dist.is_main():
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    if callback.collapse and trainer.state.best_model_checkpoint:
        if dist.is_main():
            log.warning("rl %s: keeping the best checkpoint %s (windowed reward %.3f)", phase.name,
                        trainer.state.best_model_checkpoint, trainer.state.best_metric)
            dtype = torch_dtype(trainer.args.model_init_kwargs["dtype"])
            _merged(Path(trainer.state.best_model_checkpoint), dtype).save_pretrained(partial)
    else:
        trainer.save_model(str(partial))
    rows = log_rows(trainer.state.log_history, phase.name, offset)
    if dist.is_main():
        if (partial / "adapter_config.json").is_file():  # LoRA: publish a plain model, adapters merged
            merged = _merged(partial, torch_dtype(trainer.args.model_init_kwargs["dtype"]))
            shutil.rmtree(partial)
            merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        with atomic_path(final) as tmp:
            os.replace(partial, tmp)
        write_json(done, {"steps": steps, "seconds": seconds, "collapse": callback.collapse, "rows": rows})
    dist.barrier()
    return PhaseResult(phase.name, steps, seconds, str(final), callback.collapse, rows)


def log_rows(history: list[dict], phase: str, offset: int) -> list[dict]:
    """One row per logged training step (LOG_COLUMNS) from Trainer.state.log_history."""
    keys = {"reward": "reward", "format_valid": "search/format_valid", "correct": "search/correct",
            "retrievals": "search/retrievals", "internal_steps": "search/internal_steps",
            "answer_words": "search/answer_words", "kl": "kl", "entropy": "entropy",
            "memorization_nll": "memorization/nll", "memorization_size": "memorization/size", "loss": "loss",
            "truncated": "search/truncated", "informative_fraction": "search/informative_fraction",
            "logp_mismatch_max": "sampling/logp_mismatch/max", "retrieval_retries": "search/retrieval_retries",
            "group_reward": "rewards/group/mean", "group_reward_groups": "search/group_reward_groups",
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
    from searchrl.retrieval.factory import open_retriever

    cfg = params.rl_config(ablation)
    key = run_key(ablation)
    mlflow_log = mlflow_log or (lambda metrics, step: None)
    root = Path(cfg.checkpoint_dir) / f"{key}-{config_hash(params, cfg)}"
    if retriever is None:
        retriever = open_retriever(params)
    tokenizer = load_tokenizer(cfg.init)
    teacher = None
    if cfg.memorization and cfg.rewriter == "teacher":
        teacher = _teacher_backend(params, cfg, tokenizer)
    on_gpu = torch.cuda.is_available() and params.policy.device != "cpu"
    ref = None
    if cfg.beta > 0 and cfg.estimator == "reinforce_pp_baseline" and not cfg.use_lora:
        ref = AutoModelForCausalLM.from_pretrained(causal_lm_path(cfg.init),
                                                   dtype=torch_dtype("bfloat16" if on_gpu else "float32"))
        ref.eval().requires_grad_(False)
    phases = cfg.run_phases()
    total = sum(p.max_steps for p in phases)
    init, offset, results = cfg.init, 0, []
    for i, phase in enumerate(phases):
        # checkpoints of an earlier configuration go only once this configuration's trainer was built
        drop = (lambda: _drop_stale_roots(Path(cfg.checkpoint_dir), key, root)) if i == 0 and dist.is_main() \
            else None
        res = train_phase(params, cfg, phase, init, ref, root / phase.name, offset, total, retriever,
                          tokenizer, teacher, mlflow_log, seed_base=params.seed * 1_000_003 + 104_729 * i,
                          on_trainer_built=drop)
        results.append(res)
        init, offset = res.model_dir, offset + res.steps
        if res.collapse:
            log.warning("rl: %s (phase %s); later phases are not run", res.collapse, phase.name)
            break
    metrics = {}
    if dist.is_main():  # only rank 0 publishes; the others wait, then all return the same metrics
        with atomic_path(Path(cfg.out_dir)) as tmp:
            shutil.copytree(results[-1].model_dir, tmp)
        metrics = publish_reports(Path(cfg.metrics_dir) / key, results, run_name(cfg, ablation))
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    return metrics if dist.is_main() else read_json(Path(cfg.metrics_dir) / key / "metrics.json")


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
