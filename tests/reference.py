"""A plain, readable, per-parameter ESGD-M written straight from the update rule (the
pseudo-code at the top of esgdm/rule.py and in the README).

It shares no code with the package: tests compare ``esgdm.ESGDM`` against it.  The
element-wise work runs in float32 (float64 for float64 parameters); the per-parameter
scalars are Python floats (float64), as the rule prescribes.

``exact=True`` (the default here) is the spec's rule.  ``exact=False`` is esgdm's default
rule as the README describes it: each parameter's curvature scale ``dscale`` (mean
``sqrt(D)`` over its coordinates with ``D > 0``, refreshed after each D-step) divides
coordinates with ``D == 0`` (which do not move while ``dscale`` is 0), and ``sqrt(D)``
is floored at ``dscale / 16`` elsewhere.
"""

from __future__ import annotations

import torch


class ReferenceESGDM:
    def __init__(self, param_groups, lr=1.0, betas=(0.9, 0.999), lr_warmup=0.99, eps=1e-4,
                 weight_decay=0.0, update_d_every=10, d_warmup=20, signs=None, exact=True):
        """``param_groups``: list of dicts with "params" and optional overrides.
        ``signs``: callable(param) -> Rademacher tensor shaped like it (default: random)."""
        defaults = dict(lr=lr, betas=betas, lr_warmup=lr_warmup, eps=eps, weight_decay=weight_decay)
        if isinstance(param_groups, (list, tuple)) and param_groups and isinstance(param_groups[0], dict):
            groups = param_groups
        else:
            groups = [{"params": list(param_groups)}]
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.update_d_every = update_d_every
        self.d_warmup = d_warmup
        self.steps = 0
        self.steps_since_d = 0
        self.exact = exact
        self.state = {}
        self.signs = signs or (lambda p: torch.randint(0, 2, p.shape, dtype=p.dtype, device=p.device) * 2 - 1)

    def should_create_graph(self):
        return self.steps < self.d_warmup or self.steps_since_d >= self.update_d_every

    def step(self):
        d_step = self.should_create_graph()
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        hvp = {}
        if d_step:
            vs = [self.signs(p) for p in with_grad]
            hs = torch.autograd.grad([p.grad for p in with_grad], with_grad, grad_outputs=vs,
                                     allow_unused=True)
            hvp = {p: (torch.zeros_like(p) if h is None else h) for p, h in zip(with_grad, hs)}
            self.steps_since_d = 0

        with torch.no_grad():
            for group in self.param_groups:
                lr = float(group["lr"])
                b1, b2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    work = torch.float64 if p.dtype == torch.float64 else torch.float32
                    g = p.grad.detach().to(work)
                    st = self.state.setdefault(p, {
                        "m": torch.zeros(p.shape, dtype=work, device=p.device),
                        "D": torch.zeros(p.shape, dtype=work, device=p.device),
                        "bias": 1.0, "warm": 1.0, "dscale": 0.0,
                    })
                    m, D = st["m"], st["D"]
                    m.copy_(b1 * m + (1 - b1) * g)
                    st["bias"] *= b1
                    if d_step:
                        h = hvp[p].detach().to(work)
                        D.copy_(torch.maximum(b2 * D, h * h))
                        st["warm"] *= group["lr_warmup"]
                    alpha = lr * (1 - st["warm"])
                    mhat = m + (1 - b1) * (g - m)
                    c = 1 - st["bias"] * b1
                    x = p.detach().to(work)
                    x = x * (1 - group["weight_decay"] * alpha)
                    if self.exact:
                        x = x - (alpha / c) * mhat / (D.sqrt() + group["eps"])
                    else:
                        x = x - (alpha / c) * self._unexact_quotient(mhat, D, st["dscale"], group["eps"])
                        if d_step:  # the scale the next steps use
                            seen = D[D > 0].double()
                            st["dscale"] = seen.sqrt().mean().item() if seen.numel() else 0.0
                    p.copy_(x.to(p.dtype))
        self.steps += 1
        self.steps_since_d += 1

    @staticmethod
    def _unexact_quotient(mhat, D, dscale, eps):
        """mhat / denom of the default rule: max(sqrt(D), dscale / 16) + eps where D > 0;
        dscale + eps where D == 0, or 0 there while dscale == 0."""
        floor = torch.full_like(D, dscale / 16)
        q = mhat / (torch.maximum(D.sqrt(), floor) + eps)
        unseen = 0.0 if dscale == 0 else 1.0
        return torch.where(D == 0, unseen * mhat / (dscale + eps), q)
