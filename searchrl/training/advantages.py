"""Advantage estimators for the RL stage: pure torch functions over one rollout batch.

`reinforce_pp_baseline` is exactly what R1-Searcher's OpenRLHF fork does for
`--advantage_estimator reinforce_baseline` (METHOD.md B.6, reused for R1-Searcher++ per A.4):

    1. scalar rewards r (B,) in groups of G consecutive rollouts of one question:  r <- r - mean_group(r)
    2. clamp r to [-clip, clip] (clip = 10)
    3. token rewards:  r_t = -beta * KL_t  on every token, + r on the sequence's last policy token
                       KL_t = (log pi_old(o_t) - log pi_ref(o_t)) * M_t        (k1 estimator)
    4. returns with gamma = 1:  A_t = sum_{s >= t} r_s, then A_t <- A_t * M_t
    5. global whitening over every M_t = 1 token of the batch:
                       A_t <- (A_t - mean) / std   (population std), then * M_t again

M is the loss mask: 1 on tokens the policy generated, 0 on retrieved documents (and on padding), so
documents carry no reward, no KL and no advantage. The PPO-clip surrogate (ratio clipped to
[1 - eps, 1 + eps]) is applied by the trainer's loss to these (B, T) advantages.

`grpo` is TRL's native estimator, (r - mean_group) / (std_group + 1e-4) (sample std), one value per
sequence with a k3 KL in the loss; `group_normalized` computes it with the guard below, and the trainer
hands TRL that value instead of TRL's own.

No variance is no signal, exactly. Rewards arrive as float32 (or bf16) sums of reward components, so
a group whose rollouts all scored 2/3 has a float group mean that differs from 2/3 by ~1e-8; the
reference divides the whitened batch by max(std, 1e-8), which blows that residue up to advantages of
+-1 (a step that should teach nothing teaches noise). Here: (a) group statistics are computed in
float64, and a group whose rewards differ by at most `rtol * max(1, |mean|)` (rtol 1e-6) is flat: its
centred rewards are exactly 0; (b) whitening treats a std of at most `rtol * max(1, max|x|)` as zero
variance and returns exactly 0 (the reference's 1e-8 floor would return residue / 1e-8). Above those
tolerances both functions are the reference formulas.
"""

from __future__ import annotations

import torch

RTOL = 1e-6  # relative spread below which a set of rewards / returns is treated as constant


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected shape (B,) with B a multiple of {group_size}, "
                         f"got {tuple(rewards.shape)}")
    return rewards.to(torch.float64).view(-1, group_size)


def flat_groups(rewards: torch.Tensor, group_size: int, rtol: float = RTOL) -> torch.Tensor:
    """(B / G,) bool: True for each group whose rewards are all equal (to within rtol * max(1, |mean|))."""
    g = _grouped(rewards, group_size)
    spread = g.amax(dim=1) - g.amin(dim=1)
    return spread <= rtol * g.mean(dim=1).abs().clamp(min=1.0)


def group_baseline(rewards: torch.Tensor, group_size: int, rtol: float = RTOL) -> torch.Tensor:
    """(B,) float64: r - mean of its group of `group_size` consecutive entries; exactly 0 for a flat group."""
    g = _grouped(rewards, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    centred[flat_groups(rewards, group_size, rtol)] = 0.0
    return centred.reshape(-1)


def group_normalized(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, rtol: float = RTOL
                     ) -> torch.Tensor:
    """(B,) float32: GRPO's (r - mean_group) / (std_group + eps), sample std as TRL; exactly 0 for a flat group."""
    g = _grouped(rewards, group_size)
    std = g.std(dim=1, keepdim=True, correction=1) if group_size > 1 else torch.zeros_like(g[:, :1])
    adv = (g - g.mean(dim=1, keepdim=True)) / (std + eps)
    adv[flat_groups(rewards, group_size, rtol)] = 0.0
    return adv.reshape(-1).to(torch.float32)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, T) 0/1 mask (0 for an all-zero row)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def kl_k1(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k1 KL estimate log pi_old - log pi_ref, 0 where mask is 0."""
    return (old_logps - ref_logps) * mask


def _local(t: torch.Tensor, op: str) -> torch.Tensor:
    return t


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, rtol: float = RTOL,
                  all_reduce=None) -> torch.Tensor:
    """(x - mean) / max(std, eps) over the mask=1 entries (population std, float64); 0 where mask is 0,
    and 0 everywhere when the std is at most rtol * max(1, max |x|) (no variance: no signal).

    all_reduce(tensor, "sum" | "max") -> tensor reduces the statistics over the data-parallel ranks
    (searchrl.distributed.all_reduce), so every rank whitens with the whole batch's mean and std, as
    OpenRLHF does; None = this batch alone."""
    reduce = all_reduce or _local
    x = values.to(torch.float64)
    m = mask.to(torch.float64)
    sums = reduce(torch.stack([(x * m).sum(), m.sum()]), "sum")
    n = sums[1].clamp(min=1.0)
    mean = sums[0] / n
    std = (reduce((((x - mean) * m) ** 2).sum(), "sum") / n).sqrt()
    scale = reduce((x.abs() * m).max() if m.numel() else torch.zeros((), dtype=torch.float64), "max")
    if std <= rtol * scale.clamp(min=1.0):
        return torch.zeros_like(values)
    return ((x - mean) / std.clamp(min=eps) * m).to(values.dtype)


def reinforce_pp_baseline(rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                          old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                          beta: float = 0.0, clip: float = 10.0, all_reduce=None) -> tuple[torch.Tensor, float]:
    """(B, T) float32 advantages and the mean k1 KL per policy token.

    rewards (B,): scalar reward per rollout, groups of `group_size` consecutive rollouts (whole groups
    on each rank); mask (B, T): 1 on policy tokens; old_logps / ref_logps (B, T): log-probs of the
    sampled tokens under the sampling policy and the reference policy (needed when beta > 0);
    all_reduce: see masked_whiten (the whitening spans every rank's batch).
    """
    mask64 = mask.to(torch.float64)
    r = group_baseline(rewards, group_size).clamp(-clip, clip)
    token_rewards = torch.zeros_like(mask64)
    kl = torch.zeros_like(mask64)
    if beta != 0.0:
        if old_logps is None or ref_logps is None:
            raise ValueError("reinforce_pp_baseline: beta > 0 needs old_logps and ref_logps")
        kl = kl_k1(old_logps.to(torch.float64), ref_logps.to(torch.float64), mask64)
        token_rewards = token_rewards - beta * kl
    last = last_token_index(mask64)
    has_tokens = mask64.sum(dim=1) > 0
    token_rewards[torch.arange(mask64.size(0)), last] += torch.where(has_tokens, r, torch.zeros_like(r))
    returns = token_rewards.flip(1).cumsum(1).flip(1) * mask64  # gamma = 1
    advantages = masked_whiten(returns, mask64, all_reduce=all_reduce).to(torch.float32)
    return advantages, float((kl.sum() / mask64.sum().clamp(min=1.0)).item())
