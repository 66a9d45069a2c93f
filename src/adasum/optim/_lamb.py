r"""LAMB: Adam's direction, scaled per layer by a trust ratio (You et al., 2019, Algorithm 2).

For each parameter tensor x (one layer) with gradient g, at step t:

.. math::

    m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    \hat m &= m / (1 - \beta_1^t), \qquad \hat v = v / (1 - \beta_2^t)
        \quad\text{(without bias correction: } \hat m = m,\ \hat v = v) \\
    u &= \hat m / (\sqrt{\hat v} + \epsilon) + \lambda x \\
    x &\leftarrow x - \eta \, \frac{\phi(\lVert x\rVert)}{\lVert u\rVert} \, u

with :math:`\phi(z) = \min(z, \text{trust\_clip})` (no clip by default) and the trust ratio
taken as 1 when either norm is zero, so freshly zero-initialised layers still move. The paper
uses LAMB with Adasum in delta mode: wrap it in :class:`adasum.optim.DistributedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["Lamb"]


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive moments (LAMB); see the module docstring for the update.

    Args:
        params: parameters or parameter groups.
        lr: learning rate eta.
        betas: (beta1, beta2) for the first and second moments.
        eps: added to sqrt(v_hat) for stability.
        weight_decay: lambda, decoupled (added to the Adam direction before the trust ratio).
        bias_correction: divide the moments by (1 - beta^t) as in the paper's Algorithm 2.
        trust_clip: upper bound on phi(|x|), None for phi(z) = z.

    Moments are kept in float32 for float16/bfloat16 parameters (the update is computed in float32
    and rounded once into the parameter), in the parameter's dtype otherwise.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        trust_clip: float | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if trust_clip is not None and trust_clip <= 0.0:
            raise ValueError(f"invalid trust_clip {trust_clip}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, trust_clip=trust_clip,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    # torch declares step as two overloads (closure or not); one signature serves both here.
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One LAMB update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                # Half-precision layers are updated in float32: the norms and moments of a
                # layer would otherwise lose most of their bits.
                compute = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=compute, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=compute, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g = p.grad.to(compute)
                x = p.to(compute)
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                if group["bias_correction"]:
                    m_hat, v_hat = m / (1.0 - beta1**t), v / (1.0 - beta2**t)
                else:
                    m_hat, v_hat = m, v
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(x, alpha=group["weight_decay"])
                w_norm = torch.linalg.vector_norm(x)
                u_norm = torch.linalg.vector_norm(update)
                if group["trust_clip"] is not None:
                    w_norm = w_norm.clamp(max=group["trust_clip"])
                one = torch.ones((), dtype=compute, device=p.device)
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, one)
                p.copy_(x - group["lr"] * trust * update)
        return loss
