"""Linear probes on activations: the one L2-regularised logistic regression that the gate head
(``methods.gate.GateHead.fit_probe``: is this question open?) and activation steering
(``baselines.steer.train_probe``: is this answer biased?) both fit.

Why our own and not scikit-learn's ``LogisticRegression``: the fit runs on torch tensors that are
already in memory (hidden states of up to ~10^4 rows x d=1536), must be deterministic for the heads'
reuse stamps, and the project does not otherwise depend on scikit-learn; full-batch L-BFGS with a
strong-Wolfe line search is what ``LogisticRegression(solver="lbfgs")`` does too.

The model: P(y=1 | x) = sigmoid(w . z + b) with z = (x - mean) / scale the standardised features,
minimising  sum_i c_i * logloss_i + l2/2 |w|^2  (b unpenalised). ``balanced=False``: c_i = 1 (a sum
over rows); ``balanced=True``: each class weighs 1/2 in total (c_i = 1/(2 n_class)), for probes whose
classes are far apart in size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refine_llm.errors import UserError

__all__ = ["LinearProbe", "fit_logistic"]


@dataclass
class LinearProbe:
    """A fitted probe on standardised features: score(x) = w . (x - mean) / scale + b."""

    w: torch.Tensor  # (d,) float32, on standardised features
    b: float
    mean: torch.Tensor  # (d,) float32
    scale: torch.Tensor  # (d,) float32, > 0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) logits for (N, d) activations."""
        return ((x.float() - self.mean) / self.scale) @ self.w + self.b

    def raw(self) -> tuple[torch.Tensor, float]:
        """(w_raw (d,), b_raw) with the standardisation folded in: score(x) = w_raw . x + b_raw."""
        w_raw = self.w / self.scale
        return w_raw, float(self.b - (w_raw * self.mean).sum())


def fit_logistic(x, y, l2: float, max_iter: int, balanced: bool = False, min_scale: float = 1e-4,
                 what: str = "the probe") -> LinearProbe:
    """Fit the module docstring's probe on ``x`` (N, d) and ``y`` (N,) in {0, 1} (tensors or arrays).
    ``min_scale``: the floor on each feature's standard deviation (a constant feature gets weight 0 in
    effect). ``what`` names the probe in the error raised when a class is missing."""
    X = torch.as_tensor(x).float()  # (N, d)
    t = torch.as_tensor(y).float()  # (N,)
    n_pos, n_neg = int(t.sum()), int((1 - t).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"{what} needs both classes, got {n_pos} positive and {n_neg} negative rows: "
                        "score more train questions")
    mean, scale = X.mean(0), X.std(0).clamp_min(min_scale)
    Z = (X - mean) / scale
    wts = torch.where(t > 0, 0.5 / n_pos, 0.5 / n_neg) if balanced else None  # (N,) or a plain sum
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            if wts is None:
                fit = F.binary_cross_entropy_with_logits(Z @ w + b, t, reduction="sum")
            else:
                fit = (wts * F.binary_cross_entropy_with_logits(Z @ w + b, t, reduction="none")).sum()
            loss = fit + 0.5 * l2 * (w * w).sum()
            loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(w=w.detach(), b=float(b.detach()[0]), mean=mean, scale=scale)
