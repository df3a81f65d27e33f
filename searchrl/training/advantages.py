"""Advantage estimators for the RL stage: pure torch functions over one rollout batch.

`reinforce_pp_baseline` is exactly what R1-Searcher's OpenRLHF fork does for
`--advantage_estimator reinforce_baseline` (METHOD.md B.6, reused for R1-Searcher++ per A.4):

    1. scalar rewards r (B,) in groups of G consecutive rollouts of one question:  r <- r - mean_group(r)
    2. clamp r to [-clip, clip] (clip = 10)
    3. token rewards:  r_t = -beta * KL_t  on every token, + r on the sequence's last policy token
                       KL_t = (log pi_old(o_t) - log pi_ref(o_t)) * M_t        (k1 estimator)
    4. returns with gamma = 1:  A_t = sum_{s >= t} r_s, then A_t <- A_t * M_t
    5. global whitening over every M_t = 1 token of the batch:
                       A_t <- (A_t - mean) / max(std, 1e-8)   (population std), then * M_t again

M is the loss mask: 1 on tokens the policy generated, 0 on retrieved documents (and on padding), so
documents carry no reward, no KL and no advantage. The PPO-clip surrogate (ratio clipped to
[1 - eps, 1 + eps]) is applied by the trainer's loss to these (B, T) advantages.

The other estimator, `grpo`, is TRL's native one ((r - mean_group) / (std_group + 1e-4), one value per
sequence, k3 KL in the loss); the trainer leaves it to TRL.
"""

from __future__ import annotations

import torch


def group_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r - mean of its group of `group_size` consecutive entries."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected shape (B,) with B a multiple of {group_size}, "
                         f"got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, T) 0/1 mask (0 for an all-zero row)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def kl_k1(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k1 KL estimate log pi_old - log pi_ref, 0 where mask is 0."""
    return (old_logps - ref_logps) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / max(std, eps) over the mask=1 entries (population std); 0 where mask is 0."""
    m = mask.to(values.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (values * m).sum() / n
    var = (((values - mean) * m) ** 2).sum() / n
    return (values - mean) / var.sqrt().clamp(min=eps) * m


def reinforce_pp_baseline(rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                          old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                          beta: float = 0.0, clip: float = 10.0) -> tuple[torch.Tensor, float]:
    """(B, T) advantages and the mean k1 KL per policy token.

    rewards (B,): scalar reward per rollout, groups of `group_size` consecutive rollouts;
    mask (B, T): 1 on policy tokens; old_logps / ref_logps (B, T): log-probs of the sampled tokens
    under the sampling policy and the reference policy (needed when beta > 0).
    """
    mask = mask.to(torch.float32)
    r = group_baseline(rewards.to(torch.float32), group_size).clamp(-clip, clip)
    token_rewards = torch.zeros_like(mask)
    kl = torch.zeros_like(mask)
    if beta != 0.0:
        if old_logps is None or ref_logps is None:
            raise ValueError("reinforce_pp_baseline: beta > 0 needs old_logps and ref_logps")
        kl = kl_k1(old_logps.to(torch.float32), ref_logps.to(torch.float32), mask)
        token_rewards = token_rewards - beta * kl
    last = last_token_index(mask)
    has_tokens = mask.sum(dim=1) > 0
    token_rewards[torch.arange(mask.size(0)), last] += torch.where(has_tokens, r, torch.zeros_like(r))
    returns = token_rewards.flip(1).cumsum(1).flip(1) * mask  # gamma = 1
    advantages = masked_whiten(returns, mask)
    return advantages, float((kl.sum() / mask.sum().clamp(min=1.0)).item())

