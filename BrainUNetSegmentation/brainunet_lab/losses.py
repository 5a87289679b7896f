"""Training losses: Tversky over the tumour classes, optional cross-entropy, deep supervision.

Tversky (Salehi et al. 2017) generalises soft Dice: ``TP / (TP + alpha FP + beta FN)``. With
beta > alpha, missed tumour costs more than false alarms, which counters the heavy imbalance of
small subregions (NETC, ET) against background. It is computed over the whole batch (not per
sample) so a crop without some class does not produce a meaningless 0/0 term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Network classes scored by the Tversky term: NETC, SNFH, ET (background is left to cross-entropy).
TUMOUR_CLASSES = (1, 2, 3)


def tversky_loss(probs: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7,
                 smooth: float = 1.0, classes=TUMOUR_CLASSES) -> torch.Tensor:
    """``probs`` (B, K, X, Y, Z) class probabilities, ``target`` (B, X, Y, Z) class indices -> scalar in [0, 1]."""
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.ndim))  # batch and space
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    index = torch.tensor(classes, device=probs.device)
    tversky = (tp[index] + smooth) / (tp[index] + alpha * fp[index] + beta * fn[index] + smooth)
    return (1 - tversky).mean()


class TverskyCELoss(nn.Module):
    """Tversky over softmax classes 1..3, plus ``ce_weight`` x cross-entropy on logits."""

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, ce_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.alpha, self.beta, self.ce_weight, self.smooth = alpha, beta, ce_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # softmax sums and CE in fp32 even under autocast
        loss = tversky_loss(torch.softmax(logits, 1), target, self.alpha, self.beta, self.smooth)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits, target.long())
        return loss


def downsample_labels(target: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour label map at a coarser output's size (labels must not be interpolated).

    Plain 'nearest' keeps voxel 2i for coarse voxel i: the centre of the stride-2 convolutions' field."""
    if tuple(target.shape[-3:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Applies ``base`` to every output (full resolution first); level i weighs 2^-i, weights sum to 1."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs, target)
        weights = [0.5 ** i for i in range(len(outputs))]
        total = sum(weights)
        return sum(w / total * self.base(out, downsample_labels(target, out.shape[-3:]))
                   for w, out in zip(weights, outputs))


def build_loss(alpha: float = 0.3, beta: float = 0.7, ce_weight: float = 1.0, smooth: float = 1.0) -> nn.Module:
    """The training loss; it accepts a single output or a deep-supervision list."""
    return DeepSupervisionLoss(TverskyCELoss(alpha, beta, ce_weight, smooth))
