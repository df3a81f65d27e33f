"""Masked SFT cold start (R1-Searcher++ stage 1, METHOD.md A.3) with TRL's SFTTrainer.

    L_SFT = - (1 / sum_j M_j) * sum_i M_i log p(y_i | x, y_<i),   M_i = 0 on retrieved-document tokens

Each accepted trajectory becomes one pre-tokenised example: `input_ids` = prompt + completion and
`labels` = -100 on the prompt and on every token the environment inserted, the token id elsewhere.
The completion's label mask is exactly the trajectory's model-token mask (`Trajectory.env_mask`),
the mask RL uses too. Token ids:

- policy samples keep the ids the policy sampled (token-in, token-out; never re-tokenised), when the
  stored tokenizer fingerprint matches the student's;
- teacher and oracle trajectories are re-tokenised with the student tokenizer: the prompt with the
  student's chat template, each segment on its own (`student_trajectory`), so a document block never
  shares a token with the model text around it.

Examples longer than `sft.max_length` are dropped, never truncated (a cut trajectory would teach the
model to stop mid-answer); the count is reported. SFTTrainer uses the `labels` column as is, pads
labels with -100 and averages the loss over the unmasked tokens of each batch, which is the formula
above.

Training: full fine-tune by default, LoRA via peft (`sft.use_lora`, adapters merged on save). On CPU
`use_cpu`, float32, no gradient checkpointing; on CUDA float32 master weights with bf16 autocast when
the policy dtype is bfloat16, and optional gradient checkpointing. Checkpoints every `save_steps` go to `sft.checkpoint_dir` (not a DVC
output, so an interrupted run leaves them); a rerun with the same data and settings (a fingerprint
file guards this) resumes from the newest complete one (searchrl/training/checkpoints.py: a checkpoint half-written when the
stage was killed is skipped): global step, optimizer, scheduler and RNG state. Checkpoints of another
run are deleted only after the trainer has been built, so a bad setting never costs resumable work.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from searchrl import distributed as dist
from searchrl.agent.backends import encode_untrusted
from searchrl.agent.protocols import Protocol, get_protocol
from searchrl.agent.trajectory import Segment, Trajectory
from searchrl.errors import InputError, SearchRLError
from searchrl.io import atomic_path, iter_jsonl, stable_hash
from searchrl.training.checkpoints import last_complete_checkpoint

log = logging.getLogger(__name__)

IGNORE = -100
FINGERPRINT = "fingerprint.json"
_EXTRA_KEYS = ("sampler", "tokenizer")


# ----------------------------------------------------------------------------- data
def read_trajectories(path: str | Path) -> list[tuple[Trajectory, dict]]:
    """(Trajectory, extras) per line of trajectories.jsonl; a bad line names the file and line."""
    out = []
    for lineno, obj in iter_jsonl(path):
        extras = {k: obj.pop(k, "") for k in _EXTRA_KEYS}
        try:
            traj = Trajectory.from_dict(obj)
        except (TypeError, ValueError) as err:
            raise InputError(path, f"not a trajectory ({err})", row=lineno,
                             fix="regenerate it with `dvc repro sample`") from None
        out.append((traj, extras))
    return out


def student_trajectory(traj: Trajectory, tokenizer, protocol: Protocol) -> Trajectory:
    """A copy in the student's tokens: the student's prompt for the question, each segment tokenised on
    its own (no logprobs: they were another model's, or none)."""
    prompt_text, prompt_ids = protocol.prompt_ids(tokenizer, traj.question)
    segments = [Segment(s.role, s.text, encode_untrusted(tokenizer, s.text, allow=protocol.tags), None)
                for s in traj.segments]  # another model's text: only our tags may become added tokens
    fields = {**traj.__dict__, "prompt_text": prompt_text, "prompt_ids": prompt_ids, "segments": segments}
    return Trajectory(**fields)


def sft_example(traj: Trajectory) -> dict:
    """{"input_ids", "labels"}: labels are -100 on the prompt and wherever env_mask is 0."""
    completion = traj.completion_ids
    labels = [IGNORE] * len(traj.prompt_ids) + [t if m else IGNORE for t, m in zip(completion, traj.env_mask,
                                                                                    strict=True)]
    return {"input_ids": list(traj.prompt_ids) + completion, "labels": labels}


def build_examples(rows: Iterable[tuple[Trajectory, dict]], tokenizer, tokenizer_hash: str,
                   max_length: int) -> tuple[list[dict], dict]:
    """Examples for SFTTrainer plus counts (exact ids reused, re-tokenised, dropped as too long)."""
    examples, counts = [], {"trajectories": 0, "exact_ids": 0, "retokenised": 0, "too_long": 0}
    protocols: dict[str, Protocol] = {}
    for traj, extras in rows:
        counts["trajectories"] += 1
        if extras.get("sampler") == "policy" and extras.get("tokenizer") == tokenizer_hash:
            student = traj
            counts["exact_ids"] += 1
        else:
            proto = protocols.setdefault(traj.protocol, get_protocol(traj.protocol))
            student = student_trajectory(traj, tokenizer, proto)
            counts["retokenised"] += 1
        ex = sft_example(student)
        if len(ex["input_ids"]) > max_length:
            counts["too_long"] += 1
            continue
        examples.append(ex)
    counts["examples"] = len(examples)
    counts["tokens"] = sum(len(e["input_ids"]) for e in examples)
    counts["loss_tokens"] = sum(sum(lbl != IGNORE for lbl in e["labels"]) for e in examples)
    return examples, counts


# ----------------------------------------------------------------------------- training
def _is_cuda(device: str) -> bool:
    from searchrl.models import pick_device

    return pick_device(device).startswith("cuda")


def training_args(cfg, out_dir: str | Path, seed: int, device: str, dtype: str, report_to: str | list[str],
                  max_length: int):
    """SFTConfig from the `sft` params section."""
    from trl import SFTConfig

    from searchrl.distributed import world_size

    cuda = _is_cuda(device)
    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.micro_batch_size,
        # the effective batch is batch_size whatever the number of processes (each rank accumulates its share)
        gradient_accumulation_steps=cfg.batch_size // (cfg.micro_batch_size * world_size()),
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_length=max_length,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        save_only_model=False,  # optimizer + scheduler + RNG states: an interrupted run resumes exactly
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        bf16=cuda and dtype == "bfloat16",
        gradient_checkpointing=cuda and cfg.gradient_checkpointing,  # SFTConfig's default is on
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding
        report_to=report_to,
        run_name="sft",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def fingerprint(examples: Sequence[dict], cfg, model_name: str, seed: int) -> str:
    """Identifies a training run: the data, every sft setting but output paths, the model and seed."""
    settings = cfg.model_dump(mode="json", exclude={"out_dir", "checkpoint_dir"})
    return stable_hash({"data": stable_hash(list(examples)), "sft": settings, "model": model_name, "seed": seed})


def stale_checkpoints(path: Path, key: str) -> bool:
    """True when `path` holds checkpoints of another run (different data or settings): they cannot be
    resumed. Nothing is deleted here: the caller removes them once its trainer has been built."""
    stamp = path / FINGERPRINT
    if not path.is_dir():
        return False
    try:
        old = json.loads(stamp.read_text()).get("fingerprint") if stamp.is_file() else None
    except (OSError, ValueError, AttributeError):
        old = None
    return old != key


def prepare_checkpoint_dir(path: Path, key: str) -> str | None:
    """The checkpoint to resume from (None for a fresh start): the newest complete one
    (searchrl.training.checkpoints). Checkpoints of another run are deleted first."""
    if stale_checkpoints(path, key):
        log.info("sft: %s holds checkpoints of another run; starting fresh", path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / FINGERPRINT).write_text(json.dumps({"fingerprint": key}) + "\n")
    last = last_complete_checkpoint(path)
    if last:
        log.info("sft: resuming from %s", last)
    return last


def clear_checkpoints(path: str | Path) -> None:
    """Drop the checkpoints once the model is published (each holds weights and optimizer state)."""
    shutil.rmtree(path, ignore_errors=True)


def train_sft(cfg, examples: list[dict], model, tokenizer, out_dir: str | Path, *, seed: int = 0,
              device: str = "auto", dtype: str = "float32", model_name: str = "", report_to: str | list[str] = "none",
              callbacks: Sequence = ()) -> dict:
    """Fine-tune `model` on `examples` and save it (merged, safetensors + tokenizer) to `out_dir`,
    published atomically. Returns the training summary (losses, steps, times, resume point)."""
    from datasets import Dataset
    from trl import SFTTrainer

    if not examples:
        raise SearchRLError("sft: no training examples (every trajectory was longer than sft.max_length, or "
                            "the sample stage kept none)")
    ckpt_dir = Path(cfg.checkpoint_dir)
    max_len = max(len(e["input_ids"]) for e in examples)
    args = training_args(cfg, ckpt_dir, seed, device, dtype, report_to, max_len)
    peft_config = None
    if cfg.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(list(examples)),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    # only now that the trainer exists (every setting accepted) may another run's checkpoints go;
    # rank 0 tidies the directory, then every rank picks the same newest complete checkpoint
    key = fingerprint(examples, cfg, model_name, seed)
    if dist.is_main():
        prepare_checkpoint_dir(ckpt_dir, key)
    dist.barrier()
    resume = last_complete_checkpoint(ckpt_dir, remove_incomplete=False)
    if resume:
        log.info("sft: resuming from %s", resume)
    resumed_step = int(resume.rsplit("-", 1)[-1]) if resume else 0
    t0 = time.perf_counter()
    with dist.cpu_checkpoint_loading():
        result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    if dist.world_size() > 1:
        # every rank joins the save (ZeRO-3 / FSDP gather the shards); rank 0 writes and publishes
        partial = Path(str(out_dir) + ".partial")
        trainer.save_model(str(partial))
        if dist.is_main():
            if cfg.use_lora:  # the adapters of the saved dir, merged on rank 0
                from peft import AutoPeftModelForCausalLM

                AutoPeftModelForCausalLM.from_pretrained(partial).merge_and_unload().save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            with atomic_path(out_dir) as tmp:
                os.replace(partial, tmp)
        dist.barrier()
    else:
        final = trainer.model
        if cfg.use_lora:
            final = final.merge_and_unload()
        with atomic_path(out_dir) as tmp:
            final.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    summary = {
        "examples": len(examples), "steps": int(trainer.state.global_step), "epochs": float(cfg.epochs),
        "resumed_from_step": resumed_step, "train_seconds": round(seconds, 2),
        "train_loss": float(result.training_loss), "first_loss": losses[0][1] if losses else float("nan"),
        "final_loss": losses[-1][1] if losses else float("nan"),
        "examples_per_second": round(len(examples) * cfg.epochs / max(seconds, 1e-9), 3),
    }
    log.info("sft: %d steps on %d examples in %.1fs (loss %.3f -> %.3f), saved to %s", summary["steps"],
             len(examples), seconds, summary["first_loss"], summary["final_loss"], out_dir)
    return {**summary, "log_history": trainer.state.log_history}


def loss_curve(log_history: Sequence[dict]) -> list[dict]:
    """[{step, epoch, loss, learning_rate}] from the trainer's logs (DVC plots data)."""
    return [{"step": h["step"], "epoch": round(float(h.get("epoch", 0.0)), 4), "loss": float(h["loss"]),
             "learning_rate": float(h.get("learning_rate", 0.0))} for h in log_history if "loss" in h]


def plot_loss(curve: Sequence[dict], path: str | Path, title: str = "SFT training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked NLL (model tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
