"""ESMM composition: p_ctcvr = p_ctr * p_cvr, trained over all impressions.

The cvr head then never needs a loss on the biased clicked-only sample space (it may still
get one), and it stays available for scoring. Everything is computed in log space from the
two logits a (ctr) and b (cvr), so it stays finite for any finite logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  # the usual torch alias
from torch import Tensor

__all__ = ["esmm_ctcvr_bce", "esmm_ctcvr_logit", "esmm_ctcvr_prob", "esmm_log_probs"]


def esmm_log_probs(ctr_logit: Tensor, cvr_logit: Tensor) -> tuple[Tensor, Tensor]:
    """Return (log p_ctcvr, log(1 - p_ctcvr)), each (B,), for p_ctcvr = sigmoid(a) * sigmoid(b)."""
    a, b = ctr_logit, cvr_logit  # (B,), (B,)
    log_p = F.logsigmoid(a) + F.logsigmoid(b)
    # 1 - s(a)s(b) = s(-a) + s(a)s(-b): a sum of positive terms, so no cancellation near p = 1.
    log_q = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(a) + F.logsigmoid(-b))
    return log_p, log_q


def esmm_ctcvr_logit(ctr_logit: Tensor, cvr_logit: Tensor) -> Tensor:
    """Return the logit of p_ctcvr (B,), so sigmoid() of it is p_ctr * p_cvr up to rounding."""
    log_p, log_q = esmm_log_probs(ctr_logit, cvr_logit)
    return log_p - log_q


def esmm_ctcvr_prob(ctr_logit: Tensor, cvr_logit: Tensor) -> Tensor:
    """Return p_ctcvr = sigmoid(a) * sigmoid(b), (B,), exactly the product of the two heads."""
    return torch.sigmoid(ctr_logit) * torch.sigmoid(cvr_logit)


def esmm_ctcvr_bce(ctr_logit: Tensor, cvr_logit: Tensor, target: Tensor) -> Tensor:
    """Return the per-row BCE (B,) of p_ctcvr against `target` (B,) in [0, 1], stably.

    Examples
    --------
    >>> a, b, y = torch.tensor([0.3]), torch.tensor([-1.2]), torch.tensor([1.0])
    >>> naive = -torch.log(torch.sigmoid(a) * torch.sigmoid(b))
    >>> bool(torch.allclose(esmm_ctcvr_bce(a, b, y), naive))
    True
    """
    log_p, log_q = esmm_log_probs(ctr_logit, cvr_logit)
    return -(target * log_p + (1.0 - target) * log_q)
