"""Consistency-regularised CTC (CR-CTC, Yao et al. 2025, arXiv:2410.05101): every utterance of a batch is seen
twice, with different SpecAugment masks, dropout and VTLP warps; besides the CTC loss of both views, each
view's frame posteriors learn to match the other's (a symmetric KL divergence, the target side detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..features import _lengths_mask


def consistency_loss(log_probs_a: torch.Tensor, log_probs_b: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Half of KL(b || a) + KL(a || b), each with its target view detached, summed over every utterance's own
    frames (padding left out) and over the batch. log_probs_*: (batch, frames, vocab); lengths: (batch,)."""
    a, b = log_probs_a.float(), log_probs_b.float()
    kl_b_to_a = F.kl_div(a, b.detach(), reduction="none", log_target=True).sum(-1)  # (batch, frames)
    kl_a_to_b = F.kl_div(b, a.detach(), reduction="none", log_target=True).sum(-1)
    frames = _lengths_mask(lengths.to(a.device), a.shape[1])
    return 0.5 * (kl_b_to_a + kl_a_to_b).masked_fill(~frames, 0.0).sum()
