"""The ``esgdm::step_`` operator: one schema, one fake implementation, one kernel per device.

``torch.ops.esgdm.step_`` steps the tensors of one bucket (one device, one parameter
dtype) in place, as :mod:`esgdm.rule` says.  The schema is :data:`STEP_SCHEMA`; its
arguments:

* ``params``, ``grads``, ``exp_avgs``, ``exp_avg_ds``, ``hvps`` (None on a plain step):
  one entry per tensor; each tensor dense, with the same shape and strides as its
  parameter.  ``exp_avgs``/``exp_avg_ds`` are float32 or bfloat16 (float64 for
  float64 parameters) or uint8 codes of 8-bit state (:mod:`esgdm.quant`), the rest are
  in the parameters' dtype.
* ``scalars`` float64 ``[n_slots, 4]``: per-tensor ``bias, warm, steps, dscale``,
  advanced in place; ``index`` int32 ``[n, 2]``: each tensor's slot in ``scalars`` and
  row in ``hparams`` (checked to be rows of them); ``hparams`` float64
  ``[n_groups, 6]``.  All on the parameters' device.
* ``grad_scale``, ``found_inf``: optional one-element float32 tensors on the device
  (``torch.amp.GradScaler``); the step divides ``g`` and ``h`` by ``grad_scale`` and does
  nothing at all when ``found_inf`` is nonzero.
* ``flags``: :data:`esgdm.rule.FLAG_EXACT`, :data:`esgdm.rule.FLAG_STOCHASTIC_ROUNDING`;
  ``seed``: keys the stochastic rounding.
* ``qscales`` (8-bit state only, else None): per tensor its float32 ``[n_blocks, 2]``
  block scales (:mod:`esgdm.quant`), contiguous, updated in place.
* ``kernel``: which implementation runs: a backend name (``"triton"``, ``"cuda"``,
  ``"cpu"``, ``"torch"`` or one registered with :func:`esgdm.backends.register`); what
  it steps where is :func:`esgdm.backends.why_not` (the capability table).

The CPU and CUDA implementations are the same function, :func:`step_impl`: it checks
the arguments (:func:`check_step_args`), runs the named kernel (the element-wise rule
and the per-tensor scalars, all on the device, no host read), and on D-steps refreshes
the tensors' curvature scale.  Eager calls from the optimizer go to :func:`step_impl`
directly (no boxing of five tensor lists through the dispatcher); ``torch.compile``
traces the operator through its fake implementation.  Either way the same checks run.

Under ``torch.compile`` the optimizer calls ``torch.ops.esgdm.step_flat_``
(:data:`FLAT_STEP_SCHEMA`) instead: the same step with the state handed over as the
bucket's flat buffers plus each tensor's offset, the views cut inside the operator, so
that functionalization sees one mutated tensor per buffer rather than one per tensor.
A plain step of a backend with a C++ operator of its own
(:attr:`esgdm.backends.Backend.plain_flat_op`: ``esgdm::step_flat_cpu_`` of the
``"cpu"`` backend, defined by ``esgdm._C``) calls that one: its kernel takes the tensor
lists without converting them to Python objects.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from esgdm import backends, dtypes, quant
from esgdm.buckets import index_bounds, is_dense, note_index_bounds, own_state_views, same_layout
from esgdm.rule import FLAG_EXACT, HPARAM_COLUMNS, SCALAR_COLUMNS, update_dscale

NAMESPACE = "esgdm"
#: The operator's name in :data:`NAMESPACE` (``torch.ops.esgdm.step_``).
OP_NAME = "step_"

#: The operator's schema, written once.
STEP_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_ds, "
    "Tensor[]? hvps, Tensor(d!) scalars, Tensor index, Tensor hparams, Tensor? grad_scale, "
    "Tensor? found_inf, int flags, int seed, str kernel, Tensor(e!)[]? qscales=None) -> ()"
)

#: The flat operator ``torch.ops.esgdm.step_flat_``: what the optimizer hands
#: ``torch.compile``.  The same step, with each state list given as the one flat buffer
#: its tensors are views of (``exp_avg``, ``exp_avg_d``, 8-bit state's ``qscale``) and
#: each tensor's element offset into it (``offsets``; ``block_offsets``: its first row of
#: ``qscale``).  Tensor ``i``'s state is ``flat.as_strided(params[i].shape,
#: params[i].stride(), flat.storage_offset() + offsets[i])`` (the parameters are dense and
#: their state is laid out like them: :class:`esgdm.buckets.Bucket`).  One mutated tensor
#: per buffer, not one per tensor: functionalizing the list form regenerates the buffer
#: and every later view for each view it writes (quadratic in the number of tensors).
FLAT_OP_NAME = "step_flat_"
FLAT_STEP_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_d, SymInt[] offsets, "
    "Tensor[]? hvps, Tensor(d!) scalars, Tensor index, Tensor hparams, Tensor? grad_scale, "
    "Tensor? found_inf, int flags, int seed, str kernel, Tensor(e!)? qscale=None, "
    "SymInt[]? block_offsets=None) -> ()"
)

#: ``torch.ops.esgdm.step_flat_cpu_``: :data:`FLAT_STEP_SCHEMA` for a plain step (no
#: ``hvps``, float state) of the ``"cpu"`` kernel, with a C++ kernel: defined by the
#: extension ``esgdm._C`` when it is built (:attr:`esgdm.backends.Backend.plain_flat_op`).
FLAT_CPU_OP_NAME = "step_flat_cpu_"

#: (kernel, its registration generation, device type, dtype) combinations a backend
#: said it can step (its why_not was None): asked once each, not on every call.
_CAN_STEP: set = set()


def _kernel_reason(kernel: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend ``kernel`` (built in or registered) steps ``dtype`` tensors on
    ``device``, else its reason: :func:`esgdm.backends.why_not`, which reads the
    capability table for the built-in backends."""
    key = (kernel, backends.generation(kernel), device.type, dtype)
    if key in _CAN_STEP:
        return None
    try:
        reason = backends.why_not(kernel, device, dtype)
    except ValueError as e:  # not a backend name
        return str(e)
    if reason is None:
        _CAN_STEP.add(key)
    return reason


def _state_dtypes(kernel: str, dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The state dtypes ``kernel`` takes for ``dtype`` parameters: its row of the
    capability table, or, for a registered backend, what the dtype table allows."""
    row = backends.capability(kernel)
    return dtypes.state_dtypes(dtype) if row is None else row.state_dtypes(dtype)


def _fail(message: str):
    raise ValueError(f"esgdm::step_: {message}")


def _check_table(name: str, t: Tensor, dtype: torch.dtype, width: int, device, rows=None) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.dim() != 2 or t.shape[1] != width or (rows is not None and t.shape[0] != rows):
        want = f"[{rows if rows is not None else 'n'}, {width}]"
        _fail(f"{name} must be a {dtype} tensor of shape {want}, got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        _fail(f"{name} is on {t.device}, the parameters on {device}")
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")


def check_step_args(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                    exp_avg_ds: Sequence[Tensor], hvps: Sequence[Tensor] | None, scalars: Tensor,
                    index: Tensor, hparams: Tensor, grad_scale: Tensor | None,
                    found_inf: Tensor | None, kernel: str, per_tensor: bool = True,
                    qscales: Sequence[Tensor] | None = None, state_checked: bool = False) -> None:
    """Raises ValueError naming the first argument that breaks the operator's contract.

    The common case (everything fine) is checked list-wise, a few attribute reads per
    tensor at C speed; only a failure walks the tensors one by one to name the culprit.
    The values of ``index`` are checked too: on the host, without reading the device,
    when they are known there (tables built by the optimizer, or read once before),
    else read once (one device sync; refused during CUDA graph capture).
    ``per_tensor=False`` checks the lists' lengths and the tables only: the optimizer's
    own calls, whose tensors its buckets laid out and checked when they were built,
    whose gradients and Hessian-vector products it has just checked, and whose index
    tables it built.  ``state_checked=True`` leaves out the per-tensor checks of
    ``exp_avgs``/``exp_avg_ds`` alone: views a bucket cut from its own buffers
    (:func:`esgdm.buckets.own_state_views`), laid out like the parameters by construction.
    """
    n = len(params)
    lengths = {"grads": len(grads), "exp_avgs": len(exp_avgs), "exp_avg_ds": len(exp_avg_ds)}
    if hvps is not None:
        lengths["hvps"] = len(hvps)
    for name, length in lengths.items():
        if length != n:
            _fail(f"{name} has {length} tensors, params has {n}")
    if n == 0:
        return
    p0 = params[0]
    if not isinstance(p0, Tensor) or p0.layout != torch.strided:
        _name_culprit(params, {}, None)
    device = p0.device
    reason = _kernel_reason(kernel, device, p0.dtype)
    if reason is not None:
        _fail(f"kernel {kernel!r} cannot step {p0.dtype} tensors on {device}: {reason}")
    _check_table("scalars", scalars, torch.float64, len(SCALAR_COLUMNS), device)
    _check_table("index", index, torch.int32, 2, device, rows=n)
    _check_table("hparams", hparams, torch.float64, len(HPARAM_COLUMNS), device)
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (not isinstance(t, Tensor) or t.dtype != torch.float32 or t.numel() != 1
                              or t.device != device or t.layout != torch.strided):
            _fail(f"{name} must be a one-element float32 tensor on {device}, got "
                  + (f"{t.dtype} with {t.numel()} elements on {t.device}" if isinstance(t, Tensor)
                     else type(t).__name__))
    dtype = p0.dtype
    _check_qscales(params, exp_avgs, qscales, device, per_tensor)
    if not per_tensor:
        return
    if dtype not in dtypes.PARAM_DTYPES:
        _fail(f"parameters of dtype {dtype} are not supported "
              f"(supported: {', '.join(str(d) for d in dtypes.PARAM_DTYPES)})")
    e0 = exp_avgs[0]
    state_dtype = e0.dtype if isinstance(e0, Tensor) else None
    allowed = _state_dtypes(kernel, dtype)
    if state_dtype not in allowed:
        _fail(f"exp_avgs[0] has dtype {state_dtype}; state for {dtype} parameters must be "
              f"{' or '.join(str(d) for d in allowed)}")
    lists = {"params": (params, dtype), "grads": (grads, dtype)}
    if not state_checked:
        lists.update(exp_avgs=(exp_avgs, state_dtype), exp_avg_ds=(exp_avg_ds, state_dtype))
    if hvps is not None:
        lists["hvps"] = (hvps, dtype)
    try:
        ok = _all_like(params, lists, device)
    except (AttributeError, TypeError, RuntimeError):  # not a tensor, no strides: named below
        ok = False
    if not ok:
        _name_culprit(params, lists, device)
    _check_index(index, scalars.shape[0], hparams.shape[0])


def _check_qscales(params, exp_avgs, qscales, device, per_tensor: bool) -> None:
    """8-bit state comes with its block scales, one ``[n_blocks, 2]`` float32 table per
    tensor; other state with none."""
    e0 = exp_avgs[0]
    quantized = isinstance(e0, Tensor) and e0.dtype == torch.uint8
    if not quantized:
        if qscales is not None:
            _fail(f"qscales is given but the state is {getattr(e0, 'dtype', None)}, not 8-bit (uint8) codes")
        return
    if qscales is None:
        _fail("exp_avgs hold 8-bit (uint8) codes: qscales, their block scales, is required")
    if len(qscales) != len(params):
        _fail(f"qscales has {len(qscales)} tensors, params has {len(params)}")
    if not per_tensor:
        return
    for i, (p, qs) in enumerate(zip(params, qscales)):
        want = (quant.n_blocks(p.numel()), 2)
        if (not isinstance(qs, Tensor) or qs.dtype != torch.float32 or tuple(qs.shape) != want
                or qs.device != device or not qs.is_contiguous()):
            got = (f"{qs.dtype} of shape {tuple(qs.shape)} on {qs.device}" if isinstance(qs, Tensor)
                   else type(qs).__name__)
            _fail(f"qscales[{i}] must be a contiguous float32 tensor of shape {want} on {device}, got {got}")


def _all_like(params, lists, device) -> bool:
    """List-wise, at C speed (attrgetter/method maps): a few tenths of a µs per tensor.
    True when every tensor is strided, not a negated view, of its list's dtype, on
    ``device``, and laid out exactly as its dense parameter."""
    index = params[0].get_device()
    for tensors, want in lists.values():
        if not (set(map(_layout_of, tensors)) == _STRIDED and not any(map(Tensor.is_neg, tensors))
                and set(map(_dtype_of, tensors)) == {want}
                and set(map(Tensor.get_device, tensors)) == {index}
                and set(map(_device_type_of, tensors)) == {device.type}):
            return False
    if not (all(map(Tensor.is_contiguous, params)) or all(map(is_dense, params))):
        return False
    shapes = list(map(_shape_of, params))
    strides = list(map(Tensor.stride, params))
    return all(tensors is params or (list(map(_shape_of, tensors)) == shapes
                                     and list(map(Tensor.stride, tensors)) == strides)
               for tensors, _ in lists.values())


_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")
_layout_of = operator.attrgetter("layout")
_device_type_of = operator.attrgetter("device.type")
_STRIDED = {torch.strided}


def _name_culprit(params, lists, device) -> None:
    """Walks the tensors one by one and raises for the first one that is wrong
    (``device`` None: only that each parameter is a strided tensor)."""
    lists = {"params": (params, None), **lists}
    for i, p in enumerate(params):
        for name, (tensors, want) in lists.items():
            t = tensors[i]
            if not isinstance(t, Tensor):
                _fail(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
            if t.layout != torch.strided:
                _fail(f"{name}[{i}] is a {t.layout} tensor; every tensor must be strided (dense)")
            if t.is_neg():
                _fail(f"{name}[{i}] is a negated view (is_neg()); pass t.resolve_neg()")
            if want is None:
                continue  # params[i] itself: compared with params[0] through the other lists
            if t.dtype != want:
                _fail(f"{name}[{i}] has dtype {t.dtype}, expected {want}")
            if t.device != device:
                _fail(f"{name}[{i}] is on {t.device}, params[0] on {device}")
            if t.shape != p.shape:
                _fail(f"{name}[{i}] has shape {tuple(t.shape)}, params[{i}] has shape {tuple(p.shape)}")
            if not same_layout(t, p.shape, p.stride()):
                _fail(f"{name}[{i}] has strides {t.stride()}, params[{i}] has strides {p.stride()}")
        if device is not None and not is_dense(p):
            _fail(f"params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) is not dense; "
                  "step a dense copy instead")


def _check_index(index: Tensor, n_slots: int, n_groups: int) -> None:
    """Raises unless every slot in ``index`` is a row of ``scalars`` and every group a
    row of ``hparams``: the kernels address those tables with them."""
    known = index_bounds(index)
    if known is not None and known[0] < n_slots and known[1] < n_groups:
        return
    if index.is_cuda and torch.cuda.is_current_stream_capturing():
        _fail("the values of index cannot be checked during CUDA graph capture: "
              "call the step once before capturing, with the same index tensor")
    lo, hi = torch.aminmax(index, dim=0)
    (lo_slot, lo_group), (hi_slot, hi_group) = torch.stack([lo, hi]).tolist()
    if lo_slot < 0 or lo_group < 0 or hi_slot >= n_slots or hi_group >= n_groups:
        for i, (slot, group) in enumerate(index.tolist()):
            if not 0 <= slot < n_slots:
                _fail(f"index[{i}, 0] = {slot} is not a row of scalars ({n_slots} rows)")
            if not 0 <= group < n_groups:
                _fail(f"index[{i}, 1] = {group} is not a row of hparams ({n_groups} rows)")
    note_index_bounds(index, hi_slot, hi_group)


def step_impl(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
              grad_scale, found_inf, flags, seed, kernel, qscales=None, _checked: bool = False,
              _state_checked: bool = False) -> None:
    """The operator's implementation on every device (see the module docstring)."""
    check_step_args(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                    grad_scale, found_inf, kernel, per_tensor=not _checked, qscales=qscales,
                    state_checked=_state_checked)
    if not params:
        return
    backend = backends.get(kernel)
    if qscales is None:  # (a backend registered from outside need not know qscales)
        backend.step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                     grad_scale, found_inf, int(flags), int(seed))
    else:
        backend.step(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                     grad_scale, found_inf, int(flags), int(seed), qscales=qscales)
    if hvps is not None and not flags & FLAG_EXACT:
        if qscales is None:
            update_dscale(scalars, index[:, 0].long(), exp_avg_ds, found_inf)
        else:
            quant.update_dscale(scalars, index[:, 0].long(), exp_avg_ds, qscales, found_inf)


def state_views(params: Sequence[Tensor], flat: Tensor, offsets: Sequence[int]) -> list[Tensor]:
    """Each parameter's state in ``flat``: a view with its shape and strides at its offset."""
    if len(offsets) != len(params):
        _fail(f"offsets has {len(offsets)} entries, params has {len(params)}")
    base = flat.storage_offset()
    return [flat.as_strided(p.shape, p.stride(), base + int(o)) for p, o in zip(params, offsets)]


def qscale_views(params: Sequence[Tensor], qscale: Tensor, block_offsets: Sequence[int]) -> list[Tensor]:
    """Each parameter's ``[n_blocks, 2]`` rows of the block scales ``qscale``."""
    if len(block_offsets) != len(params):
        _fail(f"block_offsets has {len(block_offsets)} entries, params has {len(params)}")
    return [qscale[int(s):int(s) + quant.n_blocks(p.numel())] for p, s in zip(params, block_offsets)]


def _flat_kernel(kernel: str):
    """``esgdm._C.step_flat`` where ``kernel`` is one of the built-in compiled kernels
    and the extension has it, else None."""
    from esgdm.backends import cpp_impl

    backend = backends.get(kernel) if kernel in ("cpu", "cuda") else None
    if not isinstance(backend, cpp_impl._CompiledBackend) or cpp_impl._C is None:
        return None
    return getattr(cpp_impl._C, "step_flat", None)


def step_flat_impl(params, grads, exp_avg, exp_avg_d, offsets, hvps, scalars, index, hparams,
                   grad_scale, found_inf, flags, seed, kernel, qscale=None, block_offsets=None) -> None:
    """``esgdm::step_flat_``: cuts the state views out of the flat buffers and runs
    :func:`step_impl` on them, with every check."""
    for name, t in (("exp_avg", exp_avg), ("exp_avg_d", exp_avg_d)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            _fail(f"{name} must be a flat (1-d) tensor, got "
                  + (f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__))
    if (qscale is None) != (block_offsets is None):
        _fail("qscale and block_offsets come together (8-bit state) or not at all")
    flat_kernel = _flat_kernel(kernel) if hvps is None and qscale is None and params else None
    if flat_kernel is not None:
        # A plain step on a compiled kernel: it cuts the views and checks every tensor in
        # C++ (here, per tensor, that cost a compiled step more than the kernel did);
        # the call's own arguments are checked here, as step_impl checks them.
        if len(offsets) != len(params):
            _fail(f"offsets has {len(offsets)} entries, params has {len(params)}")
        check_step_args(params, grads, [exp_avg] * len(params), [exp_avg_d] * len(params), None, scalars,
                        index, hparams, grad_scale, found_inf, kernel, per_tensor=False)
        _check_index(index, scalars.shape[0], hparams.shape[0])
        flat_kernel(params, grads, exp_avg, exp_avg_d, offsets, scalars, index, hparams,  # (ints: pybind reads them)
                    grad_scale, found_inf, int(flags), int(seed))
        return
    # (the buffers of a bucket laid out as the bucket's tensors: its own views, checked)
    own = own_state_views(params, exp_avg, exp_avg_d, offsets) if qscale is None else None
    if own is None:
        exp_avgs, exp_avg_ds = state_views(params, exp_avg, offsets), state_views(params, exp_avg_d, offsets)
    else:
        exp_avgs, exp_avg_ds = own
    qscales = None if qscale is None else qscale_views(params, qscale, block_offsets)
    step_impl(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
              grad_scale, found_inf, flags, seed, kernel, qscales, _state_checked=own is not None)


def _step_flat_fake(params, grads, exp_avg, exp_avg_d, offsets, hvps, scalars, index, hparams,
                    grad_scale, found_inf, flags, seed, kernel, qscale=None, block_offsets=None) -> None:
    return None


def _step_fake(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
               grad_scale, found_inf, flags, seed, kernel, qscales=None) -> None:
    # In place on its inputs and returns nothing: nothing to compute for a fake tensor.
    return None


_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # FRAGMENT: the namespace may be shared

#: Dispatch keys the operator has an implementation for: every device type torch steps
#: tensors on.  Which kernel can run there is the capability table's answer
#: (:func:`esgdm.backends.why_not`): the portable "torch" backend on every device type,
#: the fused ones where their rows say so.
DISPATCH_KEYS = ("CPU", "CUDA", "MPS", "XPU", "HPU", "PrivateUse1")


def _register(name: str, schema: str, impl, fake) -> None:
    if hasattr(getattr(torch.ops, NAMESPACE), name):
        return  # defined already (this module was reloaded)
    _lib.define(name + schema)
    for key in DISPATCH_KEYS:  # the capability table says what each device can run
        _lib.impl(name, impl, key)
    _register_fake(name, fake)


def _register_fake(name: str, fake) -> None:
    qualname = f"{NAMESPACE}::{name}"
    register_fake = getattr(torch.library, "register_fake", None)
    if register_fake is not None:  # torch >= 2.4
        register_fake(qualname, fake, lib=_lib)
    else:
        torch.library.impl_abstract(qualname, fake, lib=_lib)


_FAKES_OF_COMPILED_OPS: set[str] = set()


def register_fake_of(name: str) -> None:
    """The fake implementation (it changes nothing, returns nothing) of an operator that
    ``esgdm._C`` defines in C++: torch.compile traces it through this."""
    if name not in _FAKES_OF_COMPILED_OPS:
        _FAKES_OF_COMPILED_OPS.add(name)
        _register_fake(name, _no_output)


def _no_output(*args, **kwargs) -> None:
    return None


_register(OP_NAME, STEP_SCHEMA, step_impl, _step_fake)
_register(FLAT_OP_NAME, FLAT_STEP_SCHEMA, step_flat_impl, _step_flat_fake)


def is_compiling() -> bool:
    """Whether torch.compile is tracing this call."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False


def step_(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
          grad_scale=None, found_inf=None, flags=0, seed=0, kernel="torch", _checked=False,
          qscales=None) -> None:
    """One ESGD-M step of one bucket: ``torch.ops.esgdm.step_`` under ``torch.compile``,
    its implementation called directly in eager mode.

    ``_checked=True`` (the optimizer's eager calls) skips the per-tensor checks of
    :func:`check_step_args` that the caller's bookkeeping guarantees; at 4096 small
    tensors they cost the host more than the kernel does."""
    if is_compiling() or (params and params[0].is_meta):  # meta: the fake implementation
        torch.ops.esgdm.step_(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                              grad_scale, found_inf, flags, seed, kernel, qscales)
    else:
        step_impl(params, grads, exp_avgs, exp_avg_ds, hvps, scalars, index, hparams,
                  grad_scale, found_inf, flags, seed, kernel, qscales, _checked)


def step_flat_plain_(op_name: str, params, grads, exp_avg, exp_avg_d, offsets, scalars, index, hparams,
                     grad_scale=None, found_inf=None, flags=0, seed=0) -> None:
    """A plain step through a backend's C++ operator ``torch.ops.esgdm.<op_name>``
    (:attr:`esgdm.backends.Backend.plain_flat_op`), arguments as :func:`step_flat_`'s."""
    getattr(torch.ops.esgdm, op_name)(params, grads, exp_avg, exp_avg_d, list(offsets), scalars, index, hparams,
                                      grad_scale, found_inf, flags, seed)


def step_flat_(params, grads, exp_avg, exp_avg_d, offsets, hvps, scalars, index, hparams,
               grad_scale=None, found_inf=None, flags=0, seed=0, kernel="torch", qscale=None,
               block_offsets=None) -> None:
    """``torch.ops.esgdm.step_flat_``: :func:`step_` with the state as flat buffers and
    offsets (see :data:`FLAT_STEP_SCHEMA`); what the optimizer calls under ``torch.compile``."""
    torch.ops.esgdm.step_flat_(params, grads, exp_avg, exp_avg_d, list(offsets), hvps, scalars, index, hparams,
                               grad_scale, found_inf, flags, seed, kernel, qscale,
                               None if block_offsets is None else list(block_offsets))


__all__ = ["DISPATCH_KEYS", "FLAT_CPU_OP_NAME", "FLAT_OP_NAME", "FLAT_STEP_SCHEMA", "NAMESPACE", "OP_NAME",
           "STEP_SCHEMA", "check_step_args", "is_compiling", "register_fake_of", "state_views", "step_",
           "step_flat_", "step_flat_impl", "step_flat_plain_", "step_impl"]
