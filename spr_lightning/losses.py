"""DPO losses (SPR §3.3, Eq. 4) as small functions on per-sample sequence log-probs.

Each variant is one function whose docstring carries its formula; :func:`dpo_loss` picks one from
:data:`DPO_LOSSES`. Definitions follow TRL's ``DPOTrainer`` (reverse-KL DPO), so numbers are
comparable with what TRL users know. Notation: ``Δ = (π_c − ref_c) − (π_r − ref_r)`` with sequence
log-probs summed over completion tokens, ``β`` the KL strength, ``ε`` the label smoothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(delta: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: Tensor) -> Tensor:
    """Eq. 4 of SPR / DPO: ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)``.

    ``ε > 0`` is conservative DPO (cDPO): labels are assumed flipped with probability ε.
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def robust_loss(delta: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: Tensor) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): ``(−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)``, ε ∈ [0, ½)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def hinge_loss(delta: Tensor, *, beta: float, **_: Tensor) -> Tensor:
    """SLiC hinge: ``max(0, 1 − βΔ)``."""
    return torch.relu(1 - beta * delta)


def ipo_loss(
    delta: Tensor, *, beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor,
    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None, **_: Tensor,
) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17) on length-averaged log-ratios, as TRL does:

    ``(c/|y_c| − r/|y_r| − 1/(2β))²`` with ``c = π_c − ref_c``, ``r = π_r − ref_r`` and ``|y|`` the number
    of completion tokens (clamped to ≥ 1).
    """
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (completion token counts)")
    chosen_avg = chosen_logratios / chosen_lengths.to(chosen_logratios.dtype).clamp(min=1.0)
    rejected_avg = rejected_logratios / rejected_lengths.to(rejected_logratios.dtype).clamp(min=1.0)
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2


def chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """RPO's extra term (Pang et al. 2024; TRL's ``rpo_alpha``): ``−Σ_b π_c(b) / Σ_b |y_c(b)|``.

    The chosen answers' negative log-likelihood per completion token over the batch. Added to DPO with weight α it
    keeps the chosen answers likely: plain DPO may lower both answers' log-probs as long as the rejected ones fall
    faster, which on a weak policy drags down the very answers it prefers.
    """
    return -chosen_logps.float().sum() / chosen_lengths.to(torch.float32).sum().clamp(min=1.0)


DPO_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample DPO losses and implicit rewards.

    Args:
        policy_chosen_logps: ``[B]`` summed completion log-probs of the chosen answers under the policy.
        policy_rejected_logps: ``[B]`` same for the rejected answers.
        ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
        ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
        beta: KL strength β (SPR: 0.1).
        loss_type: one of :data:`DPO_LOSSES` (``sigmoid`` is SPR's Eq. 4).
        label_smoothing: ε for ``sigmoid`` (cDPO) and ``robust``.
        chosen_lengths: ``[B]`` completion token counts, needed by ``ipo``.
        rejected_lengths: ``[B]`` same for the rejected answers.

    Returns:
        ``(losses[B], chosen_rewards[B], rejected_rewards[B])``; rewards are ``β·(policy − reference)``,
        detached. Computed in fp32 whatever the input dtype.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    losses = DPO_LOSSES[loss_type](
        chosen_logratios - rejected_logratios,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
