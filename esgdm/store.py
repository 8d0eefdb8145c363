"""The bucket store: an optimizer's flat state, its views, and every check before a write.

:class:`BucketStore` holds the (device, dtype) :class:`~esgdm.buckets.Bucket` s of one
:class:`esgdm.ESGDM` and everything derived from them:

* building the buckets, and rebuilding them (moving the state along) when the
  parameters change: the layout signature (:meth:`BucketStore.sync`), and the backend
  each bucket is stepped by (:meth:`BucketStore.backend_for`);
* the state as the user sees it: ``opt.state[p]`` holds views into the flat buffers,
  and edits of ``opt.state`` (an entry reset, a tensor assigned) are followed
  (:meth:`BucketStore.sync_user_state`, the ``_Watch*`` classes);
* the device tables: hyper-parameters per group (:meth:`BucketStore.device_hparams`;
  the index tables are the buckets');
* the validation pass: gradients and Hessian-vector products gathered per bucket and
  checked before anything is written (:meth:`BucketStore.gather`,
  :meth:`BucketStore.check_like`), then the write itself, one ``esgdm::step_`` call per
  bucket (:meth:`BucketStore.apply`);
* the plain steps' short cut where the compiled kernels step every bucket: the same
  checks and writes with the per-tensor work in C++ (:meth:`BucketStore.plan_step`,
  ``esgdm._C.StepPlan``), so that a step's host cost does not grow with the number of
  tensors at Python's speed.

The store keeps no reference to its optimizer: each method that reads the param
groups, ``opt.state`` or an option is handed the optimizer.  The schedule (which step
is a D-step) is the optimizer's; ``h`` is :mod:`esgdm.curvature`'s.
"""

from __future__ import annotations

import collections
import numbers
import operator
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from esgdm import backends, checkpoint, ops, traced
from esgdm.buckets import (
    Bucket,
    any_dtensor,
    build_buckets,
    is_dtensor,
    local,
    overlaps,
    real_view,
    same_layout,
    shared_memory,
)
from esgdm.checkpoint import KEY_BIAS, KEY_EXP_AVG, KEY_EXP_AVG_D, KEY_QSCALE, KEY_STEP, KEY_WARM
from esgdm.hyperparams import check_group
from esgdm.rule import BIAS, DSCALE, FLAG_EXACT, HPARAM_COLUMNS, STEPS, WARM, seed32

if TYPE_CHECKING:
    from esgdm.optimizer import ESGDM

_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")
_shape_of = operator.attrgetter("shape")
_layout_of = operator.attrgetter("layout")
_STRIDED = {torch.strided}
# Device-type tests cheaper than building each tensor's torch.device (with get_device).
_ON_DEVICE_TYPE = {"cpu": operator.attrgetter("is_cpu"), "cuda": operator.attrgetter("is_cuda")}

def _frontend_helpers():
    """esgdm._C's C++ helpers for the per-step bookkeeping, if the extension has them."""
    try:
        from esgdm.backends.cpp_impl import _C
    except Exception:  # noqa: BLE001 - the helpers are an optimisation only
        return None
    # gather_checked_grads: an extension built before it existed is not used at all.
    return _C if _C is not None and hasattr(_C, "layout_key") and hasattr(_C, "gather_checked_grads") else None


_FRONTEND = _frontend_helpers()

#: Whether plain steps may take the StepPlan short cut where esgdm._C has it (the tests
#: compare both paths).
USE_PLAN = True


def _dispatches_to_python(t: Tensor) -> bool:
    """Whether ``t`` is a tensor subclass that dispatches to Python (a DTensor, a
    FakeTensor): no memory of its own for a kernel to read."""
    return torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)


def all_params(param_groups: list[dict]) -> list[Tensor]:
    return [p for group in param_groups for p in group["params"]]


def param_ids(param_groups: list[dict]) -> tuple[tuple[int, ...], ...]:
    """The parameters' identities, by group (what each build is keyed on first)."""
    return tuple(tuple(map(id, group["params"])) for group in param_groups)


def _hparam_values(group: dict) -> tuple:
    """The group's values of :data:`esgdm.rule.HPARAM_COLUMNS`, as given (check_group
    names a missing or malformed one)."""
    betas: Any = group.get("betas")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        b1 = b2 = betas
    return (group.get("lr"), b1, b2, group.get("lr_warmup"), group.get("eps"), group.get("weight_decay"))


def hparam_row(group: dict) -> tuple:
    """The group's row of the device hyper-parameter table (a tensor value contributes
    0: it is copied on the device)."""
    return tuple(0.0 if isinstance(v, Tensor) else float(v) for v in _hparam_values(group))


def _value_key(v: object) -> object:
    if type(v) in _PLAIN_TYPES:
        return v
    if isinstance(v, Tensor):
        return ("tensor", id(v))  # its value is the device's business
    if isinstance(v, numbers.Real):
        return ("real", float(v))  # (a numpy scalar would compare element-wise with a tuple)
    return ("other", id(v))  # refused by check_group


def hparam_key(group: dict) -> tuple:
    """What the group's row was uploaded and checked for: every value of the table (a
    tensor by identity) and the flags a step reads, so that an edit of
    ``opt.param_groups`` is checked as the constructor checks it."""
    key = (*_hparam_values(group), group.get("maximize", False), group.get("differentiable", False))
    return key if _PLAIN_TYPES.issuperset(map(type, key)) else tuple(map(_value_key, key))


_PLAIN_TYPES = frozenset({float, bool})  # values that are their own key (the common case, fast)


class BucketStore:
    """The buckets of one optimizer and what is derived from them (see the module)."""

    def __init__(self) -> None:
        self.buckets: list[Bucket] = []
        self.signature: tuple | None = None  # the layout the buckets were built for
        self.params_key: int | None = None  # esgdm._C.params_key when they were last current
        self.meta_signature: tuple | None = None  # the same in metadata (compiled steps)
        self.built_params: list[Tensor] = []  # the parameters the buckets were built for
        self.serial = ""  # this build's number in esgdm.traced ("": none, or built while traced)
        self.any_dtensor = False
        self.backend_choice: dict[tuple, tuple] = {}  # bucket key -> (backend, its note or None)
        self.param_keys: dict[int, int] = {}  # id(p) -> p's index in optimizer order
        self.hparam_tables: dict[torch.device, Tensor] = {}  # device -> float64 [n_groups, 6]
        self.hparam_tables_for: tuple | None = None  # the group values the tables hold (hparam_key)
        self.hparam_tensors: list[tuple[int, int, Tensor]] = []  # (group, column, tensor value)
        self.watch = _Watch()
        self.state_obj: Any = None  # the opt.state object whose edits flag self.watch
        self.plan: Any = None  # esgdm._C.StepPlan of the current buckets (plan_step)
        self.plan_launchers: list[tuple[int, Any]] = []  # (bucket index, launcher) the plan leaves to us
        self.plan_lock = threading.Lock()  # a plan step with launches: one thread at a time
        self.plan_for: tuple | None = None  # the (signature, backend_choice) it was built for

    # ---------------------------------------------------------------- state views

    def watch_state(self, opt: ESGDM) -> None:
        """Makes ``opt.state`` (and each entry) flag user edits (see :class:`_Watch`)."""
        self.watch = _Watch()
        state = _WatchedState(self.watch)
        for p, entry in dict(opt.state).items():
            wrap = entry and isinstance(entry, dict)  # (an entry that is not a parameter's may be anything)
            dict.__setitem__(state, p, _WatchedEntry(self.watch, entry) if wrap else entry)
        opt.state = state
        self.state_obj = state

    def read_state(self, opt: ESGDM, p: Tensor) -> dict:
        """One parameter's state as the user sees it (what was assigned wins)."""
        return {k: local(v) if isinstance(v, Tensor) else v for k, v in opt.state[p].items()}

    def write_state(self, opt: ESGDM, b: Bucket, i: int, saved: dict) -> None:
        """Copies one parameter's state into bucket ``b`` (converting between float and
        8-bit state) and exposes it as views."""
        b.load(i, real_view(_shard_of(saved[KEY_EXP_AVG], b.params[i])),
               real_view(_shard_of(saved[KEY_EXP_AVG_D], b.params[i])), saved.get(KEY_QSCALE))
        for col, key in SCALAR_KEYS:
            b.scalars[i, col] = torch.as_tensor(saved.get(key, 0.0), dtype=torch.float64).to(b.device)
        b.scalars[i, DSCALE] = b.curvature_scale([i])[0].to(b.device)
        self.expose_state(opt, b, i)

    def expose_state(self, opt: ESGDM, b: Bucket, i: int) -> None:
        b.exposed[i] = True
        opt.state[b.params[i]] = _WatchedEntry(self.watch, {
            KEY_EXP_AVG: b.exposed_view(b.exp_avg_views[i], i),
            KEY_EXP_AVG_D: b.exposed_view(b.exp_avg_d_views[i], i),
            **{key: b.scalar(i, col) for col, key in SCALAR_KEYS},
            **({} if b.qscale_views is None else {KEY_QSCALE: b.qscale_views[i]}),
        })

    def expose_stepped(self, opt: ESGDM, b: Bucket, idx: list[int] | None) -> None:
        """Shows the state of the tensors ``idx`` (None: all) of ``b`` that had none."""
        if not b.all_exposed:
            for i in (range(len(b)) if idx is None else idx):
                if not b.exposed[i]:
                    self.expose_state(opt, b, i)
            b.all_exposed = all(b.exposed)

    def load_state(self, opt: ESGDM, state: dict) -> None:
        """Writes the validated per-parameter ``state`` (:func:`esgdm.checkpoint.validate`)."""
        for b in self.buckets:
            b.exposed = [False] * len(b)
            for i, p in enumerate(b.params):
                # The loaded values may be views of this very state (torch.distributed.
                # checkpoint loads in place into what state_dict() returned): copy, then
                # reset only what the checkpoint does not cover.
                if p in state:
                    self.write_state(opt, b, i, state[p])
                else:
                    b.reset_state(i)
            b.all_exposed = all(b.exposed)

    def sync_user_state(self, opt: ESGDM, buckets: list[Bucket]) -> None:
        """Follows what users do to ``opt.state`` as with any torch.optim optimizer:
        ``opt.state[p] = {}`` (or deleting it) resets that parameter's state, and
        assigning a new value to a state key (a tensor, or a number for the scalars)
        copies it in, checked as a checkpoint is.  Every edit is checked before any is
        written: a bad one raises and changes nothing."""
        if opt.state is not self.state_obj:  # opt.state = {...} replaced
            self.watch_state(opt)
            self.watch.dirty = True
        if not self.watch.dirty:
            return  # nothing edited since the last step: O(1)
        resets, writes = [], []
        for b in buckets:
            for i, p in enumerate(b.params):
                if not b.exposed[i]:
                    continue
                entry = opt.state.get(p)
                if entry is not None and len(entry) == 5 + b.quantized \
                        and _is_view(entry.get(KEY_EXP_AVG), b.exp_avg_views[i]) \
                        and _is_view(entry.get(KEY_EXP_AVG_D), b.exp_avg_d_views[i]) \
                        and (b.qscale_views is None or entry.get(KEY_QSCALE) is b.qscale_views[i]) \
                        and all(_is_scalar_view(entry.get(key), b.scalars, i, col) for col, key in SCALAR_KEYS):
                    continue
                if entry is not None and not isinstance(entry, dict):
                    raise ValueError(f"opt.state[p] of the parameter of shape {tuple(p.shape)} must be a dict "
                                     f"(or empty, to reset it), got {type(entry).__name__}")
                if not entry:  # reset
                    resets.append((b, i, p))
                    continue
                as_shown = torch.view_as_complex if b.complex[i] else (lambda t: t)
                shown = {KEY_EXP_AVG: as_shown(b.exp_avg_views[i]), KEY_EXP_AVG_D: as_shown(b.exp_avg_d_views[i]),
                         **{key: b.scalar(i, col) for col, key in SCALAR_KEYS}}
                if b.qscale_views is not None:
                    shown[KEY_QSCALE] = b.qscale_views[i]
                merged = {**shown, **entry}
                if getattr(merged[KEY_EXP_AVG], "dtype", None) != torch.uint8:  # float values: no scales
                    merged.pop(KEY_QSCALE, None)
                shape = b.tensors[i].shape[:-1] if b.complex[i] else b.tensors[i].shape
                for key in (KEY_EXP_AVG, KEY_EXP_AVG_D):
                    merged[key] = local(merged[key])
                checkpoint.state_entry("opt.state[p][{}]", merged, shape, complex_state=b.complex[i],
                                       kept_in=torch.float32 if b.quantized else b.state_dtype)
                merged.update(checkpoint.state_scalars(
                    f"opt.state[p][{{}}] of the parameter of shape {tuple(p.shape)}".format, merged))
                writes.append((b, i, {k: v.clone() if isinstance(v, Tensor) else v for k, v in merged.items()}))
        for b, i, p in resets:
            b.reset_state(i)
            b.exposed[i] = False
            b.all_exposed = False
            opt.state.pop(p, None)
        for b, i, merged in writes:
            self.write_state(opt, b, i, merged)
        self.watch.dirty = False

    # ------------------------------------------------------------------- buckets

    def _layout(self, opt: ESGDM) -> tuple:
        """What the buckets were built for: the parameters (and their groups), and where
        each one's data is and how it is laid out (``model.to(...)`` and ``p.data = t``
        keep the Parameter object but move its data: a new dtype, device or shape comes
        with new memory, a new layout with new strides).  Three C-level maps."""
        ids = param_ids(opt.param_groups)
        params = all_params(opt.param_groups)
        if self.any_dtensor:  # FSDP2: what matters is each rank's local shard
            params = [local(p) for p in params]
        elif _FRONTEND is not None:
            return (ids, _FRONTEND.layout_key(params))  # the same, hashed in C++
        return (ids, tuple(map(Tensor.data_ptr, params)), tuple(map(Tensor.stride, params)))

    @staticmethod
    def _meta_layout(opt: ESGDM) -> tuple:
        """The parameters and their metadata (what a compiled step can compare)."""
        return (param_ids(opt.param_groups), *_meta_of(all_params(opt.param_groups)))

    def _built_for(self, ids: tuple) -> bool:
        """Whether the buckets were built for the parameters ``ids`` (by group) as they
        are now.  The store holds those parameters, so equal ids are the same objects."""
        return self.meta_signature is not None and ids == self.meta_signature[0] \
            and _meta_of(self.built_params) == self.meta_signature[1:]

    def sync(self, opt: ESGDM) -> list[Bucket]:
        """The (device, dtype) buckets of ``opt``'s parameters, rebuilt (moving the state
        along) when the parameters changed.  Raises before changing anything when state
        cannot follow."""
        # The usual case in one C++ call: the same parameter objects in the same groups,
        # with the same memory and layout, as when the buckets were last found current.
        fast = None
        if _FRONTEND is not None and hasattr(_FRONTEND, "params_key") and not ops.is_compiling():
            fast = _FRONTEND.params_key([g["params"] for g in opt.param_groups])
            if fast is not None and fast == self.params_key and self.buckets:
                return self.buckets
        params = all_params(opt.param_groups)
        self.any_dtensor = any_dtensor(params)
        if ops.is_compiling():
            # Addresses cannot be traced: compare metadata, once, when the step is traced
            # (esgdm.traced): the guards are then one per parameter (its identity, from
            # id()) and one on the build's serial number, not one per entry compared.
            if self.buckets and self.serial:
                if traced.ask(self.serial, "_built_for", param_ids(opt.param_groups)):
                    return self.buckets
            elif self.buckets and self._meta_layout(opt) == self.meta_signature:
                return self.buckets  # (built inside a traced step: compared entry by entry)
            layout = None
        else:
            layout = self._layout(opt)
            if layout == self.signature:
                self.params_key = fast
                return self.buckets
            if self.signature is None and self.buckets and self._meta_layout(opt) == self.meta_signature:
                self.signature = layout  # built inside a compiled step: same parameters
                self.serial = traced.number(self)  # (numbered here, outside the trace)
                for built in self.buckets:
                    built.enroll()
                return self.buckets
        old = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        for p in params:
            t = local(p)
            if t.layout != torch.strided or t.is_neg():
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is now "
                                 + (f"a {t.layout} tensor" if t.layout != torch.strided else "a negated view")
                                 + ": only plain strided tensors can be stepped")
            if overlaps(p):
                raise ValueError(f"a parameter of shape {tuple(p.shape)} now has strides {p.stride()}: "
                                 "its elements share memory (an expanded tensor), which cannot be stepped")
            b, i = old.get(id(p), (None, 0))
            if b is not None and p in opt.state and opt.state[p]:
                if tuple(b.exp_avg_views[i].shape) != tuple(real_view(local(p)).shape):
                    raise ValueError(
                        f"a parameter changed shape from {tuple(b.exp_avg_views[i].shape)} to "
                        f"{tuple(real_view(local(p)).shape)} (p.data = ... with another shape): its optimizer "
                        "state cannot follow; reset it with opt.state[p] = {} first")
        if not ops.is_compiling():
            pair = shared_memory([real_view(local(p)) for p in params])
            if pair is not None:
                i, j = pair
                raise ValueError(
                    f"parameters {i} and {j} (in optimizer order; shapes {tuple(params[i].shape)} and "
                    f"{tuple(params[j].shape)}) share memory: stepping one would change the other. Give each "
                    "parameter memory of its own (to tie weights, use one Parameter in both places)")
        new = build_buckets(opt.param_groups, opt.state_dtype)
        chosen = {b.key: self._resolve(opt, b) for b in new}
        # Nothing above mutated anything; now move the existing state across (entries
        # whose key is not a parameter, which torch.optim passes through, stay as they are).
        ours = {id(p) for b in self.buckets for p in b.params} | {id(p) for p in params}
        saved = {p: self.read_state(opt, p) for p in list(opt.state)
                 if isinstance(p, Tensor) and id(p) in ours and opt.state[p]}
        for key in [k for k in opt.state if isinstance(k, Tensor) and id(k) in ours]:
            del opt.state[key]
        self.buckets, self.signature, self.backend_choice = new, layout, chosen
        self.params_key = fast
        self.plan = None
        self.meta_signature = self._meta_layout(opt)
        self.built_params = params
        self.serial = "" if ops.is_compiling() else traced.number(self)
        self.param_keys = {id(p): k for k, p in enumerate(params)}
        self.hparam_tables_for = None
        for b in new:
            for i, p in enumerate(b.params):
                if p in saved:
                    self.write_state(opt, b, i, saved[p])
        return self.buckets

    @staticmethod
    def _resolve(opt: ESGDM, b: Bucket) -> tuple:
        """The backend for bucket ``b`` (and its note); with ``fused=True``, a fused one."""
        backend, note = backends.resolve(opt.backend, b.device, b.dtype, b.state_dtype)
        if getattr(opt, "fused", None) and backend.name == "torch":
            raise backends.BackendUnavailableError(
                f"fused=True, but no fused esgdm kernel can step {b.dtype} parameters on {b.device}"
                + (f" ({note})" if note else "") + ": construct ESGDM without fused=True")
        return backend, note

    def backend_for(self, bucket: Bucket) -> backends.Backend:
        return self.backend_choice[bucket.key][0]

    # ------------------------------------------------------------ plain-step plan

    def plan_step(self, opt: ESGDM, grad_scale: Tensor | None, found_inf: Tensor | None) -> bool:
        """A plain step through the C++ :class:`esgdm._C.StepPlan`, when every bucket has
        one: the parameters unchanged (same objects, groups, memory and layout) and every
        gradient present and laid out like its parameter, which the plan checks in one
        C++ pass, then each bucket on its kernel (the compiled ones run inside the plan;
        a launch bucket's launcher, :meth:`esgdm.backends.Backend.plain_step_launcher`,
        is called once the plan has written its gradients' addresses).  False, with no
        parameter or state written, when the general path must step (it also builds the
        plan, :meth:`make_plan`)."""
        plan = self.plan
        # (is_compiling first: torch 2.11's Dynamo cannot trace id() of a tuple)
        if ops.is_compiling() or plan is None or not USE_PLAN \
                or self.plan_for != (id(self.signature), id(self.backend_choice)) \
                or any(g.get("maximize", False) for g in opt.param_groups):
            return False
        # (both O(1) unless something changed; if the parameters did, the general path
        # that follows finds the state edits applied and nothing else changed)
        self.sync_user_state(opt, self.buckets)
        hparams = self.device_hparams(opt, self.buckets)
        tables = [hparams[b.device] for b in self.buckets]
        groups = [g["params"] for g in opt.param_groups]
        flags, seed = opt._flags(), seed32(opt.seed)
        if not self.plan_launchers:
            status = plan.step(groups, tables, grad_scale, found_inf, flags, seed)
        else:
            # The plan holds the gathered gradients, and its tables describe them, until
            # release(): one thread's step, launches and release at a time.
            with self.plan_lock:
                status = plan.step(groups, tables, grad_scale, found_inf, flags, seed)
                if status == 0:
                    try:
                        for k, launcher in self.plan_launchers:
                            launcher(tables[k], grad_scale, found_inf, flags, seed)
                    finally:
                        plan.release()
        if status != 0:
            if status == 1:  # a parameter changed: the general path re-syncs the buckets
                self.plan, self.plan_for = None, None  # (and make_plan builds a new plan)
            return False
        for b in self.buckets:
            self.expose_stepped(opt, b, None)
        self.watch.dirty = False  # our own writes to opt.state
        return True

    def make_plan(self, opt: ESGDM) -> None:
        """Builds the StepPlan of the current buckets if every one is stepped as plain
        dense real tensors by a compiled kernel or by a backend with a
        :meth:`~esgdm.backends.Backend.plain_step_launcher` (else :meth:`plan_step` keeps
        to the general path)."""
        if ops.is_compiling():  # (first: torch 2.11's Dynamo cannot trace id() of a tuple)
            return
        key = (id(self.signature), id(self.backend_choice))
        if (not USE_PLAN or _FRONTEND is None or not hasattr(_FRONTEND, "StepPlan") or self.plan_for == key
                or self.signature is None):
            return
        self.plan, self.plan_for, self.plan_launchers = None, key, []
        if self.any_dtensor or not self.buckets:
            return
        groups = [g["params"] for g in opt.param_groups]
        if not all(type(g) is list for g in groups):
            return
        launches: list[tuple | None] = []
        launchers = []
        for k, b in enumerate(self.buckets):
            backend, note = self.backend_choice[b.key]
            if (backend is not backends.get(backend.name) or note is not None or b.any_complex
                    or b.any_dtensor or not b.all_dense):
                return
            if backend.steps_in_plan:  # (not a backend registered under a built-in name)
                launches.append(None)
                continue
            launcher = backend.plain_step_launcher(b.tensors, b.exp_avg_views, b.exp_avg_d_views,
                                                   b.qscale_views, b.scalars, b.index(None))
            if launcher is None:
                return
            launches.append((launcher.table, launcher.host, list(launcher.grad_columns)))
            launchers.append((k, launcher))
        self.plan = _FRONTEND.StepPlan(groups, [
            (b.tensors, b.exp_avg_views, b.exp_avg_d_views, b.qscale_views, b.scalars, b.index(None),
             [b.exp_avg, b.exp_avg_d] + ([b.qscale] if b.quantized else []), launch)
            for b, launch in zip(self.buckets, launches)])
        self.plan_launchers = launchers

    # ---------------------------------------------------------- hyper-parameters

    def device_hparams(self, opt: ESGDM, buckets: list[Bucket]) -> dict:
        """The float64 ``[n_groups, 6]`` hyper-parameter table on each bucket's device.

        Checked (as the constructor checks them) and uploaded only when a group's values
        changed (an LR scheduler that assigns a Python float costs one small non-blocking
        copy); a tensor value (lr, a beta, ...) is read and checked when the optimizer first
        meets that tensor, then copied on the device every step, never read by the host."""
        key = tuple(hparam_key(g) for g in opt.param_groups)
        devices = {b.device for b in buckets}
        if key != self.hparam_tables_for or not devices.issubset(self.hparam_tables):
            if opt.capturable and _capturing():
                raise RuntimeError("ESGDM hyper-parameters changed during CUDA graph capture: set them "
                                   "before capturing (use a tensor lr to change lr between replays)")
            for gi, group in enumerate(opt.param_groups):
                check_group(group, f" in param group {gi}", exact=opt.exact)
            rows = torch.tensor([hparam_row(g) for g in opt.param_groups], dtype=torch.float64)
            rows = rows.reshape(-1, len(HPARAM_COLUMNS))
            for device in devices:
                table = self.hparam_tables.get(device)
                if table is None or table.shape != rows.shape:
                    self.hparam_tables[device] = rows.to(device)
                elif device.type == "cuda":
                    table.copy_(rows.pin_memory(), non_blocking=True)  # same address: graphs see it
                else:
                    table.copy_(rows)
            self.hparam_tensors = [(gi, col, v) for gi, group in enumerate(opt.param_groups)
                                   for col, v in enumerate(_hparam_values(group)) if isinstance(v, Tensor)]
            self.hparam_tables_for = key
        for gi, col, value in self.hparam_tensors:
            for device in devices:
                self.hparam_tables[device][gi, col].copy_(value.reshape(()), non_blocking=True)
        return self.hparam_tables

    # ----------------------------------------------------------- validation pass

    def gather(self, opt: ESGDM, b: Bucket) -> tuple[list[int] | None, list[Tensor]]:
        """Indices (None: all) and gradients of the tensors of ``b`` that have one, checked
        (:meth:`check_like`) and laid out like their state.  Raises before anything is
        written."""
        if _FRONTEND is not None and not b.any_dtensor and not b.any_complex and not ops.is_compiling():
            grads, _present, like, bad = _FRONTEND.gather_checked_grads(b.params)
            if like and b.all_dense:
                return None, grads  # every gradient there, checked and laid out like its state
            if bad >= 0:
                self.refuse(opt, b, bad, grads[bad], "gradient")
            checked = True
        else:
            grads = [p.grad for p in b.params] if ops.is_compiling() else list(map(_grad_of, b.params))
            checked = False
        if b.any_dtensor:
            grads = [None if g is None else local(g) for g in grads]
        idx = None
        if any(g is None for g in grads):
            idx = [i for i, g in enumerate(grads) if g is not None]
            grads = [grads[i] for i in idx]
        if b.any_complex:  # stepped as the real view, like the parameter
            with torch.enable_grad():  # (a view that keeps the gradient's graph, for the HVP)
                grads = [real_view(g) if isinstance(g, Tensor) and g.layout == torch.strided else g
                         for g in grads]
        if not checked:
            self.check_like(opt, b, idx, grads, "gradient")
        return idx, self.match_layout(b, idx, grads)

    def check_like(self, opt: ESGDM, b: Bucket, idx: list[int] | None, tensors: list[Tensor],
                   what: str) -> None:
        """Raises, naming the parameter, unless each of ``tensors`` (the ``what`` of
        bucket ``b``'s tensors ``idx``, None: all) is a plain strided tensor with its
        parameter's dtype, device and shape: what the kernels may read as such (any
        strides: :meth:`match_layout` copies what is not laid out like the state)."""
        if ops.is_compiling():
            # No attrgetter maps, nor is_neg(), under Dynamo; the compiled operator's
            # dispatcher resolves negated views (and its implementation checks again).
            ok = all(isinstance(t, Tensor) and t.layout == torch.strided and t.dtype == b.dtype
                     and t.device == b.device for t in tensors)
            if ok:
                ok = _bucket_says(b, "shapes_are", idx, tuple(tuple(t.shape) for t in tensors))
        else:  # list-wise, at C speed
            shapes = b.shapes if idx is None else [b.shapes[i] for i in idx]
            on_device = _ON_DEVICE_TYPE.get(b.device.type)
            try:
                ok = (set(map(_layout_of, tensors)) <= _STRIDED and set(map(_dtype_of, tensors)) <= {b.dtype}
                      and set(map(Tensor.get_device, tensors)) <= {b.device_index}
                      and (all(map(on_device, tensors)) if on_device is not None
                           else set(map(_device_of, tensors)) <= {b.device})
                      and list(map(_shape_of, tensors)) == shapes and not any(map(Tensor.is_neg, tensors))
                      and (b.any_dtensor or not any(map(_dispatches_to_python, tensors))))
            except (AttributeError, TypeError):  # not a tensor: named below
                ok = False
        if not ok:
            for k, t in enumerate(tensors):
                self.refuse(opt, b, k if idx is None else idx[k], t, what)

    @staticmethod
    def refuse(opt: ESGDM, b: Bucket, i: int, t: Any, what: str) -> None:
        """Raises naming parameter ``i`` of bucket ``b`` (by group and index) if ``t``
        cannot be read as its ``what``; returns if it can."""
        p = b.tensors[i]
        problem = None
        if not isinstance(t, Tensor):
            problem = f"is a {type(t).__name__}, not a tensor"
        elif t.layout != torch.strided:
            problem = (f"is sparse ({t.layout}): ESGDM does not support sparse gradients"
                       if t.is_sparse else f"has layout {t.layout}, not torch.strided")
        elif t.dtype != p.dtype:
            problem = f"has dtype {t.dtype}, parameter has dtype {p.dtype}"
        elif t.device != p.device:
            problem = f"is on {t.device}, parameter is on {p.device}"
        elif t.shape != p.shape:
            problem = f"has shape {tuple(t.shape)}, parameter has shape {tuple(p.shape)}"
        elif t.is_neg():
            problem = "is a negated view (is_neg()): its memory holds the opposite values; pass t.resolve_neg()"
        elif _dispatches_to_python(t):
            problem = (f"is a {type(t).__name__}, a tensor subclass without memory of its own, and the "
                       "parameter is a plain tensor: the kernels step plain tensors")
        if problem is not None:
            raise RuntimeError(f"{what} of {_describe(opt.param_groups, b.params[i])} {problem}")

    @staticmethod
    def match_layout(b: Bucket, idx: list[int] | None, tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` (checked: their parameters' shapes) with the strides of their
        parameters' state (copied where not)."""
        compiling = ops.is_compiling()
        if compiling and _bucket_says(b, "strides_are", idx, tuple(tuple(t.stride()) for t in tensors)):
            return tensors
        want = b.strides if idx is None else [b.strides[i] for i in idx]
        if not compiling and list(map(Tensor.stride, tensors)) == want:
            return tensors  # the usual case, checked at C speed
        out = []
        for k, (t, st) in enumerate(zip(tensors, want)):
            p = b.tensors[k if idx is None else idx[k]]
            if not same_layout(t, p.shape, st):
                with torch.set_grad_enabled(t.requires_grad):  # a D-step differentiates the copy
                    t = torch.empty_strided(p.shape, st, dtype=t.dtype, device=t.device).copy_(t)
            out.append(t)
        return out

    # --------------------------------------------------------------------- write

    @staticmethod
    def apply(b: Bucket, backend: backends.Backend, idx, grads, hvps, hparams, grad_scale, found_inf, flags: int,
              seed: int) -> None:
        """Runs the op on bucket ``b``'s active tensors, laid out as it expects."""
        kernel = backend.name
        full = idx is None
        params = b.tensors if full else [b.tensors[i] for i in idx]
        writeback = []
        if not b.all_dense:  # strided slices: step a dense copy, then write it back
            for k, i in enumerate(range(len(b)) if full else idx):
                if not b.dense[i]:
                    params = list(params) if params is b.tensors else params
                    t = params[k]  # (an empty tensor's .contiguous() keeps odd strides)
                    params[k] = t.contiguous() if t.numel() else torch.empty(t.shape, dtype=t.dtype, device=t.device)
                    writeback.append((b.tensors[i], params[k]))
        exp_avgs = b.exp_avg_views if full else [b.exp_avg_views[i] for i in idx]
        exp_avg_ds = b.exp_avg_d_views if full else [b.exp_avg_d_views[i] for i in idx]
        if ops.is_compiling():
            # The flat buffers and offsets, not the views: functionalization copies the
            # whole buffer (and every later view) once per mutated view of it.
            # (params are dense, their state laid out like them: Bucket.strides.)
            offsets, starts = _bucket_says(b, "offsets_of", idx)
            if hvps is None and not b.quantized and backend.plain_flat_op:  # (its kernel is C++)
                ops.step_flat_plain_(backend.plain_flat_op, params, grads, b.exp_avg, b.exp_avg_d, offsets,
                                     b.scalars, b.index(idx), hparams, grad_scale, found_inf, flags, seed)
            else:
                ops.step_flat_(params, grads, b.exp_avg, b.exp_avg_d, offsets, hvps, b.scalars, b.index(idx),
                               hparams, grad_scale, found_inf, flags, seed, kernel,
                               b.qscale if b.quantized else None, starts)
        else:
            qscales = b.qscale_views
            if qscales is not None and not full:
                qscales = [qscales[i] for i in idx]
            ops.step_(params, grads, exp_avgs, exp_avg_ds, hvps, b.scalars, b.index(idx), hparams,
                      grad_scale, found_inf, flags, seed, kernel, _checked=True, qscales=qscales)
        for p, work in writeback:
            p.copy_(work)
        if hvps is not None and b.any_dtensor and not flags & FLAG_EXACT:
            _global_curvature_scale(b, idx, exp_avg_ds, found_inf)


def _bucket_says(b: Bucket, question: str, idx: list[int] | None, *args: Any) -> Any:
    """Bucket ``b``'s answer to a layout question (:class:`esgdm.buckets.Bucket`) in a
    traced step: asked once, when the step is traced (:mod:`esgdm.traced`), so that the
    per-tensor entries it compares are not guards on every call."""
    key = None if idx is None else tuple(idx)
    if b.serial:
        return traced.ask(b.serial, question, key, *args)
    return getattr(b, question)(key, *args)  # (built inside a traced step: read entry by entry)


def _meta_of(params: list[Tensor]) -> tuple:
    """Strides, shapes, dtypes and devices of ``params`` (their local shards)."""
    params = [local(p) for p in params]
    return (tuple(tuple(p.stride()) for p in params), tuple(tuple(p.shape) for p in params),
            tuple(p.dtype for p in params), tuple(str(p.device) for p in params))


def _describe(param_groups: list[dict], p: Tensor) -> str:
    """``"parameter 2 in group 0"``: where ``p`` is in the param groups (error paths)."""
    for gi, group in enumerate(param_groups):
        for k, q in enumerate(group["params"]):
            if q is p:
                return f"parameter {k} in group {gi}"
    return f"a parameter of shape {tuple(p.shape)}"  # pragma: no cover - buckets follow the groups


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


#: The per-parameter scalars shown in ``opt.state[p]``: (column of ``scalars``, key).
SCALAR_KEYS = ((BIAS, KEY_BIAS), (WARM, KEY_WARM), (STEPS, KEY_STEP))


def _is_scalar_view(exposed: Any, scalars: Tensor, i: int, col: int) -> bool:
    """Whether ``exposed`` is the 0-d view of ``scalars[i, col]`` that was shown (each
    indexing makes a new view object, so this compares addresses)."""
    return (isinstance(exposed, Tensor) and exposed.dim() == 0 and exposed.dtype == scalars.dtype
            and exposed.data_ptr() == scalars.data_ptr() + (i * scalars.stride(0) + col * scalars.stride(1))
            * scalars.element_size())


def _is_view(exposed: Any, view: Tensor) -> bool:
    """Whether ``exposed`` is how :meth:`BucketStore.expose_state` showed ``view`` (itself,
    a DTensor around it, or, for a complex parameter, its complex view)."""
    if exposed is view or (is_dtensor(exposed) and exposed._local_tensor is view):
        return True
    if isinstance(exposed, Tensor) and exposed.is_complex() and not is_dtensor(exposed):
        real = torch.view_as_real(exposed)
        return (real.data_ptr() == view.data_ptr() and real.shape == view.shape
                and real.stride() == view.stride() and real.dtype == view.dtype)
    return False


def _shard_of(value: Any, p: Any) -> Tensor:
    """What of a state value belongs in ``p``'s local state: a DTensor's local shard
    (sharded like ``p`` when it came from this optimizer), a plain tensor's slice for
    ``p``'s shard when ``p`` is a DTensor and ``value`` is whole, else the value."""
    if is_dtensor(value):
        if is_dtensor(p) and value.placements == p.placements and value.device_mesh == p.device_mesh:
            return value._local_tensor
        value = value.full_tensor()
    if is_dtensor(p) and tuple(value.shape) == tuple(p.shape):
        return local_block(value, p)
    return value


def local_block(full: Tensor, p: Any) -> Tensor:
    """The block of the whole tensor ``full`` that DTensor ``p``'s local shard holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def _global_curvature_scale(b: Bucket, idx: list[int] | None, exp_avg_ds: list[Tensor],
                            found_inf: Tensor | None) -> None:
    """Rewrites the curvature scale (``dscale``, the mean of ``sqrt(D)`` over the
    coordinates with ``D > 0``) of bucket ``b``'s sharded tensors as that of the whole
    tensor: the operator saw only this rank's shard.  The default rule's floor depends
    on it everywhere, so without this FSDP2 would not step as one process does.  Every
    rank calls it alike (it all-reduces over the mesh dimensions a tensor is sharded on)."""
    from esgdm.hvp import all_reduce, local_and_reduction  # (torch.distributed: imported when needed)

    for i, d in zip(range(len(b)) if idx is None else idx, exp_avg_ds):
        p = b.params[i]
        if not is_dtensor(p):
            continue
        _, key = local_and_reduction(p)
        if key is None:
            continue  # replicated: the shard is the whole tensor
        sums = torch.stack([d.double().sqrt().sum(), (d != 0).sum().double()])
        all_reduce(sums, key)
        new = torch.where(sums[1] > 0, sums[0] / sums[1].clamp(min=1), torch.zeros_like(sums[0]))
        if found_inf is not None:
            new = torch.where(found_inf.to(new.device) != 0, b.scalars[i, DSCALE], new)
        b.scalars[i, DSCALE] = new


class _Watch:
    """Set when user code edits ``opt.state`` (a parameter's entry replaced, deleted or
    changed), so that a step looks at the state only when something changed."""

    def __init__(self):
        self.dirty = False


class _WatchedEntry(dict):
    """One parameter's state dict: edits flag the optimizer's :class:`_Watch`."""

    __slots__ = ("_watch",)

    def __init__(self, watch: _Watch, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._watch = watch

    def __reduce__(self):  # copies are plain dicts (the optimizer re-wraps them)
        return (dict, (dict(self),))


class _WatchedState(collections.defaultdict):
    """``opt.state``: a ``defaultdict(dict)`` whose edits flag a :class:`_Watch`."""

    def __init__(self, watch: _Watch, *args):
        super().__init__(dict, *args)
        self._watch = watch

    def __reduce__(self):  # copies are plain defaultdicts (the optimizer re-wraps them)
        return (collections.defaultdict, (dict, dict(self)))


def _flagging(base: type, name: str) -> Callable:
    """``base.name`` that first flags the owner's :class:`_Watch` (an edit happened)."""
    def method(self, *args, **kwargs):
        self._watch.dirty = True
        return getattr(base, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


for _name in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault"):
    setattr(_WatchedEntry, _name, _flagging(dict, _name))
    setattr(_WatchedState, _name, _flagging(collections.defaultdict, _name))
del _name


__all__ = ["BucketStore", "all_params", "hparam_key", "hparam_row", "local_block", "param_ids"]
