"""``esgdm.ESGDM``: the ESGD-M optimizer as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import copy
import numbers
import operator
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from esgdm import backends
from esgdm.buckets import Bucket, build_buckets, same_layout
from esgdm.hvp import FD_SCHEMES, RngSnapshot, autograd_hvp, finite_difference_hvp
from esgdm.rule import group_table, host_scalars

# Per-parameter state keys; the same names the original ``esgd.ESGD`` used.
EXP_AVG, EXP_AVG_D, BIAS, WARM = "exp_avg", "exp_avg_d", "exp_avg_bias_corr", "lr_warmup_cumprod"


def _check_group(group: dict, where: str) -> None:
    """Raises ValueError naming the first invalid hyper-parameter of ``group``."""
    missing = [k for k in ("lr", "betas", "lr_warmup", "eps", "weight_decay") if k not in group]
    if missing:
        raise ValueError(f"Missing hyper-parameters{where}: {', '.join(missing)}")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr{where}: a tensor lr must hold one value, got shape {tuple(lr.shape)}")
        lr = lr.item()
    if not 0.0 <= lr:
        raise ValueError(f"Invalid lr{where}: {lr!r} (must be >= 0)")
    betas = group["betas"]
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas{where}: {betas!r} (must be a pair of floats)") from None
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0{where}: {b1!r} (must be in [0, 1))")
    if not 0.0 <= b2 <= 1.0:
        raise ValueError(f"Invalid beta parameter at index 1{where}: {b2!r} (must be in [0, 1])")
    if not 0.0 <= group["lr_warmup"] < 1.0:
        raise ValueError(f"Invalid lr_warmup{where}: {group['lr_warmup']!r} (must be in [0, 1))")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"Invalid eps{where}: {group['eps']!r} (must be >= 0)")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay{where}: {group['weight_decay']!r} (must be >= 0)")


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")
    return int(value)


_dtype_of = operator.attrgetter("dtype")
_grad_of = operator.attrgetter("grad")
_is_sparse = operator.attrgetter("is_sparse")


def _as_layout(t: Tensor, p: Tensor, strides) -> Tensor:
    """``t`` itself if it already has the given strides, else a copy that has them."""
    if same_layout(t, p.shape, strides):
        return t
    return torch.empty_strided(p.shape, strides, dtype=p.dtype, device=p.device).copy_(t)


class ESGDM(Optimizer):
    r"""ESGD-M: equilibrated SGD with Nesterov momentum and an Adamax-style curvature estimate.

    Every few steps (a *D-step*) ESGD-M takes a Hessian-vector product ``h = H v``
    with a Rademacher vector ``v`` and keeps ``D = max(b2 * D, h * h)`` as a
    per-coordinate estimate of ``diag(H^2)``; every step divides a Nesterov-momentum
    step by ``sqrt(D) + eps``.  The learning rate is invariant to rescaling the loss
    or the parameters.  The exact rule is in :mod:`esgdm.rule`.

    On a D-step the gradients must carry a graph, so call::

        loss.backward(create_graph=opt.should_create_graph())
        opt.step()

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or 0-d Tensor): step size (default 1.0; start near 0.5).
        betas (tuple[float, float]): momentum decay and the inf-norm decay of the
            curvature estimate (default (0.9, 0.999)).
        lr_warmup (float): exponential warmup; the step size on a parameter's k-th
            D-step is ``lr * (1 - lr_warmup**k)``; 0 disables it (default 0.99).
        eps (float): added to ``sqrt(D)`` (default 1e-4).
        weight_decay (float): decoupled weight decay, scaled by the current step size
            (default 0).
        update_d_every (int): curvature refresh period in steps (default 10).
        d_warmup (int): the first ``d_warmup`` steps always refresh curvature (default 20).
        backend (str, optional): ``"auto" | "triton" | "cuda" | "cpu" | "torch"``;
            defaults to ``$ESGDM_BACKEND`` or ``"auto"``.  ``auto`` picks, per
            (device, dtype) bucket, the fastest backend that can run there.
        generator (torch.Generator, optional): source of the Rademacher vectors.
        hvp (str): how D-steps get ``H v``. ``"autograd"`` (default) differentiates the
            gradient (the backward pass needs ``create_graph=True``).
            ``"finite_difference"`` needs ``step(closure)`` and takes
            ``(g(θ + r v) - g(θ)) / r`` from one more gradient evaluation, with no
            double backward: use it for models with fused kernels (e.g.
            ``scaled_dot_product_attention``) that have no double backward.
        fd_scheme (str): ``"forward"`` (default; one extra gradient per D-step) or
            ``"central"`` (two extra gradients, more accurate).
        fd_radius (float, optional): the finite-difference step ``r``; by default
            chosen from the parameter dtype and the size of θ (see :mod:`esgdm.hvp`).

    State: each parameter's ``exp_avg`` (``m``) and ``exp_avg_d`` (``D``) are float32
    views into flat per-(device, dtype) buffers; ``exp_avg_bias_corr`` (``bias``) and
    ``lr_warmup_cumprod`` (``warm``) are float64 scalars.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup: float = 0.99,
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        update_d_every: int = 10,
        d_warmup: int = 20,
        *,
        backend: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
        hvp: str = "autograd",
        fd_scheme: str = "forward",
        fd_radius: Optional[float] = None,
    ):
        defaults = dict(lr=lr, betas=betas, lr_warmup=lr_warmup, eps=eps, weight_decay=weight_decay)
        _check_group(defaults, "")
        self.update_d_every = _check_count("update_d_every", update_d_every)
        self.d_warmup = _check_count("d_warmup", d_warmup)
        self.backend = backends.check_name(backend if backend is not None else backends.default_name())
        self.generator = generator
        self.sign_seed: Optional[int] = None  # shared by all ranks of a distributed run
        if hvp not in ("autograd", "finite_difference"):
            raise ValueError(f"Invalid hvp: {hvp!r}; choose 'autograd' or 'finite_difference'")
        if fd_scheme not in FD_SCHEMES:
            raise ValueError(f"Invalid fd_scheme: {fd_scheme!r}; choose one of {', '.join(FD_SCHEMES)}")
        if fd_radius is not None and not fd_radius > 0:
            raise ValueError(f"Invalid fd_radius: {fd_radius!r} (must be > 0)")
        self.hvp, self.fd_scheme, self.fd_radius = hvp, fd_scheme, fd_radius
        self.steps = 0
        self.steps_since_d = 0
        self._buckets: list[Bucket] = []
        self._signature: Optional[list] = None
        self._chosen: dict[tuple, backends.Backend] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group; its hyper-parameters are checked and nothing changes on error."""
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group, f" in param group {n_before}")
            for p in group["params"]:
                if not p.dtype.is_floating_point:
                    raise ValueError(f"ESGDM optimizes floating-point parameters only, got one of dtype {p.dtype}")
        except ValueError:
            self.param_groups.pop()
            raise

    def should_create_graph(self) -> bool:
        """Whether the next ``step()`` takes a Hessian-vector product, so the backward
        pass before it needs ``create_graph=True``::

            loss.backward(create_graph=opt.should_create_graph())

        Always False with ``hvp="finite_difference"``, which needs no graph.
        """
        return self.hvp == "autograd" and self.is_d_step()

    def is_d_step(self) -> bool:
        """Whether the next ``step()`` refreshes the curvature estimate."""
        return self.steps < self.d_warmup or self.steps_since_d >= self.update_d_every

    # ----------------------------------------------------------------- buckets

    def _layout_changed(self) -> bool:
        """Whether the buckets no longer describe the parameters: a parameter was added,
        removed or moved between groups, or one changed dtype or device in place
        (``model.to(...)`` swaps ``p.data`` and keeps the Parameter object).

        Runs every step, so it sticks to C-level ``map`` calls (about 0.1 µs per tensor).
        """
        if self._signature is None:
            return True
        ids = [list(map(id, group["params"])) for group in self.param_groups]
        if ids != self._signature:
            return True
        for b in self._buckets:
            if set(map(_dtype_of, b.params)) != {b.dtype}:
                return True
            if set(map(Tensor.get_device, b.params)) != {b.device_index}:
                return True
        return False

    def buckets(self) -> list[Bucket]:
        """The (device, dtype) buckets, rebuilt when the parameter set has changed."""
        if self._layout_changed():
            signature = [list(map(id, group["params"])) for group in self.param_groups]
            old = {p: self.state[p] for p in list(self.state)} if self._signature is not None else {}
            new = build_buckets(self.param_groups)
            chosen = {}
            for b in new:
                backend, note = backends.resolve(self.backend, b.device, b.dtype)
                chosen[b.key] = (backend, note)
            # Nothing above mutated anything; now move existing state across.
            self.state.clear()
            self._buckets, self._signature, self._chosen = new, signature, chosen
            for b in new:
                for i, p in enumerate(b.params):
                    if p in old and old[p]:
                        self._adopt_state(b, i, old[p])
        return self._buckets

    def backend_for(self, bucket: Bucket) -> backends.Backend:
        return self._chosen[bucket.key][0]

    def _adopt_state(self, b: Bucket, i: int, saved: dict) -> None:
        """Copies one parameter's state into bucket ``b`` and exposes it as views."""
        b.exp_avg_views[i].copy_(saved[EXP_AVG])
        b.exp_avg_d_views[i].copy_(saved[EXP_AVG_D])
        b.bias[i] = float(saved[BIAS])
        b.warm[i] = float(saved[WARM])
        self._expose_state(b, i)

    def _expose_state(self, b: Bucket, i: int) -> None:
        b.exposed[i] = True
        self.state[b.params[i]] = {
            EXP_AVG: b.exp_avg_views[i],
            EXP_AVG_D: b.exp_avg_d_views[i],
            BIAS: b.bias[i],
            WARM: b.warm[i],
        }

    # -------------------------------------------------------------------- step

    def _gather(self, b: Bucket) -> tuple[list[int], list[Tensor]]:
        """Indices and gradients of the tensors of ``b`` that have a gradient.

        (torch itself guarantees that a gradient has its parameter's shape, dtype and
        device, so only the layout is checked here.)
        """
        grads = list(map(_grad_of, b.params))
        if any(g is None for g in grads):
            idx = [i for i, g in enumerate(grads) if g is not None]
            grads = [grads[i] for i in idx]
        else:
            idx = list(range(len(grads)))
        if any(map(_is_sparse, grads)):
            shape = next(tuple(b.params[i].shape) for i, g in zip(idx, grads) if g.is_sparse)
            raise RuntimeError(f"ESGDM does not support sparse gradients (parameter of shape {shape})")
        return idx, grads

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Performs one optimization step.

        Args:
            closure (callable, optional): re-evaluates the model and returns the loss.

        If anything raises before the update is applied (a missing graph, a sparse
        gradient, an invalid hyper-parameter, an unavailable backend), parameters and
        optimizer state are left exactly as they were.
        """
        d_step = self.is_d_step()
        finite_difference = d_step and self.hvp == "finite_difference"
        if finite_difference and closure is None:
            raise RuntimeError(
                "hvp='finite_difference' needs opt.step(closure) on D-steps: a closure that "
                "zeroes the gradients, computes the loss on the batch and calls loss.backward()"
            )
        loss = None
        rng = RngSnapshot() if finite_difference else None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        buckets = self.buckets()
        for gi, group in enumerate(self.param_groups):
            _check_group(group, f" in param group {gi}")
        table = group_table(self.param_groups)

        work = []  # (bucket, active indices, grads)
        for b in buckets:
            idx, grads = self._gather(b)
            if idx:
                work.append((b, idx, grads))

        hvps_by_bucket: list[Optional[list[Tensor]]] = [None] * len(work)
        if d_step and work:
            hvps_by_bucket = self._hvps(work, closure if finite_difference else None, rng)

        # Everything that can fail on bad input has run; from here on we write.
        for (b, idx, grads), hvps in zip(work, hvps_by_bucket):
            index = np.asarray(idx)
            new_bias, new_warm, scalars = host_scalars(
                table[b.group_index[index]], b.bias_np[index], b.warm_np[index], d_step
            )
            backend, note = self._chosen[b.key]
            if note is not None:
                backends.warn_once(note)
            self._apply(b, backend, idx, grads, hvps, torch.from_numpy(scalars))
            b.bias_np[index] = new_bias
            b.warm_np[index] = new_warm
            if not b.all_exposed:  # first gradient of some tensor: show its state
                for i in idx:
                    if not b.exposed[i]:
                        self._expose_state(b, i)
                b.all_exposed = all(b.exposed)

        self._count_step(d_step)
        return loss

    @torch.compiler.disable
    def _count_step(self, d_step: bool) -> None:
        """Advances the step counters.  Kept out of torch.compile graphs: Dynamo drops
        attribute writes on Optimizer objects made inside a compiled step()."""
        if d_step:
            self.steps_since_d = 0
        self.steps += 1
        self.steps_since_d += 1

    @staticmethod
    def _match_layout(b: Bucket, idx: list[int], tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` with the strides of their parameters' state (copied where not)."""
        want = b.strides if len(idx) == len(b) else [b.strides[i] for i in idx]
        if list(map(Tensor.stride, tensors)) == want:
            return tensors  # the usual case, checked at C speed
        return [t if t.stride() == st else _as_layout(t, b.params[i], st)
                for i, t, st in zip(idx, tensors, want)]

    def _signs(self, work) -> list[Tensor]:
        """Rademacher vectors for the active tensors, one flat draw per bucket."""
        out = []
        for b, idx, _ in work:
            v = b.signs(self._sign_generator(b.device))
            out += [v[i] for i in idx]
        return out

    def _sign_generator(self, device: torch.device) -> Optional[torch.Generator]:
        """Where the sign vectors come from: the user's generator if given; in a
        distributed run, a generator seeded alike on every rank (from rank 0's seed and
        the step count), so that all ranks probe the same direction; else the global RNG.
        """
        if self.generator is not None:
            return self.generator
        if self.sign_seed is None:
            if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return None
            seed = [int(torch.randint(0, 2**62, ()).item())]
            dist.broadcast_object_list(seed, src=0)
            self.sign_seed = seed[0]
        gen = torch.Generator(device=device)
        gen.manual_seed((self.sign_seed + 1_000_003 * self.steps) % 2**63)
        return gen

    def _hvps(self, work, closure, rng) -> list[list[Tensor]]:
        """Hessian-vector products of every active tensor, split back by bucket.

        With a closure they come from finite differences, else from autograd.  The
        sign vectors are handed over without a reference kept here, so the finite
        difference can free them before its probe runs.
        """
        params = [b.params[i] for b, idx, _ in work for i in idx]
        grads = [g for _, _, gs in work for g in gs]
        if closure is not None:
            idle = [p for b in self._buckets for p in b.params if p.grad is None]
            try:
                hvps = finite_difference_hvp(
                    params, grads, self._signs(work), closure, rng, self.fd_scheme, self.fd_radius
                )
            finally:
                for p in idle:  # the probe must not leave gradients behind
                    p.grad = None
        else:
            hvps = autograd_hvp(params, grads, self._signs(work))
        out, start = [], 0
        for _, idx, _ in work:
            out.append(hvps[start:start + len(idx)])
            start += len(idx)
        return out

    def _apply(self, b: Bucket, backend, idx, grads, hvps, scalars) -> None:
        """Runs the backend on bucket ``b``'s active tensors, laid out as it expects."""
        gs = self._match_layout(b, idx, grads)
        hs = None if hvps is None else self._match_layout(b, idx, hvps)
        full = len(idx) == len(b)
        params = list(b.params) if full else [b.params[i] for i in idx]
        writeback = []
        if not b.all_dense:  # strided slices: step a dense copy, then write it back
            for k, i in enumerate(idx):
                if not b.dense[i]:
                    params[k] = params[k].contiguous()
                    writeback.append((b.params[i], params[k]))
        if full:
            exp_avgs, exp_avg_ds = b.exp_avg_views, b.exp_avg_d_views
        else:
            exp_avgs = [b.exp_avg_views[i] for i in idx]
            exp_avg_ds = [b.exp_avg_d_views[i] for i in idx]
        backend.step(params, gs, exp_avgs, exp_avg_ds, hs, scalars)
        for p, work in writeback:
            p.copy_(work)

    # ------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """The optimizer state, with a ``global_state`` entry as the original ``esgd.ESGD``."""
        global_state = {
            "update_d_every": self.update_d_every,
            "d_warmup": self.d_warmup,
            "steps": self.steps,
            "steps_since_d": self.steps_since_d,
        }
        if self.sign_seed is not None:
            global_state["sign_seed"] = self.sign_seed
        return {"global_state": global_state, **super().state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint written by :meth:`state_dict` or by the original ``esgd.ESGD``.

        State is copied into this optimizer's buffers (any device, any dtype the
        values can be cast from); everything is checked before anything changes.
        """
        for hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result

        try:
            glob = state_dict["global_state"]
            counters = {
                "update_d_every": _check_count("update_d_every", glob["update_d_every"]),
                "d_warmup": _check_count("d_warmup", glob["d_warmup"]),
                "steps": int(glob["steps"]),
                "steps_since_d": int(glob["steps_since_d"]),
                "sign_seed": glob.get("sign_seed"),
            }
        except KeyError as e:
            raise ValueError(f"loaded state dict is not an ESGD-M checkpoint: missing {e}") from None

        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        id_to_param = {}
        new_groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {gi} has {len(group['params'])} parameters, the loaded state dict has {len(saved['params'])}"
                )
            id_to_param.update(zip(saved["params"], group["params"]))
            new = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
            new["params"] = group["params"]
            _check_group(new, f" in loaded param group {gi}")
            new_groups.append(new)

        per_param = {}
        for key, entry in state_dict["state"].items():
            if key not in id_to_param:
                raise ValueError(f"loaded state dict has state for unknown parameter id {key!r}")
            p = id_to_param[key]
            missing = [k for k in (EXP_AVG, EXP_AVG_D, BIAS, WARM) if k not in entry]
            if missing:
                raise ValueError(f"state of parameter id {key!r} lacks {missing}")
            for k in (EXP_AVG, EXP_AVG_D):
                if tuple(entry[k].shape) != tuple(p.shape):
                    raise ValueError(
                        f"state {k!r} of parameter id {key!r} has shape {tuple(entry[k].shape)}, "
                        f"the parameter has shape {tuple(p.shape)}"
                    )
            per_param[p] = entry

        # All checked: now write.
        for group, new in zip(self.param_groups, new_groups):
            group.clear()
            group.update(new)
        self.__dict__.update(counters)
        self._signature = None
        self.state.clear()
        for b in self.buckets():
            b.exp_avg.zero_()
            b.exp_avg_d.zero_()
            b.bias.fill_(1.0)
            b.warm.fill_(1.0)
            for i, p in enumerate(b.params):
                if p in per_param:
                    self._adopt_state(b, i, per_param[p])

        for hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            hook(self)


#: The name of the original implementation's class.
ESGD = ESGDM

__all__ = ["ESGD", "ESGDM"]
