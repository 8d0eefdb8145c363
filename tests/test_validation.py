"""Every tensor a step reads is checked before the first write, on every backend.

The optimizer checks each bucket's gradients (and, on D-steps, Hessian-vector
products) for dtype, device, shape and layout before any kernel runs; ``esgdm::step_``
called directly checks every tensor and the index table.  A refused step changes
nothing: parameters, state, counters and the global RNG are as before, and the next
valid step matches that of an optimizer that never saw the bad one.  Gradients that
are merely laid out otherwise (transposed, sliced, expanded) are stepped as their
contiguous copies would be.

Each case runs on every backend available here ("torch", "cpu", and "triton" in
Triton's interpreter without a GPU), with and without the C++ front-end helper that
checks the gradients on the common path.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import esgdm
import esgdm.store
from esgdm import backends, ops

CPU = torch.device("cpu")


def _available(name):
    return backends.get(name).why_not(CPU, torch.float32) is None


BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(not _available(n), reason=f"no {n} backend here"))
            for n in ("torch", "cpu", "triton")]


@pytest.fixture(params=["helper", "python"])
def frontend(request, monkeypatch):
    """With the C++ gather helper (when built) and with the pure-Python path."""
    if request.param == "python":
        monkeypatch.setattr(esgdm.store, "_FRONTEND", None)
    elif esgdm.store._FRONTEND is None:
        pytest.skip("esgdm._C has no front-end helpers here")
    return request.param


def loss_of(ps):
    return sum((p.float() ** 4 + p.float() ** 2).sum() for p in ps)


def trained(backend, params, steps=2, **kw):
    """An optimizer after ``steps`` valid steps (D-steps, then plain ones), with the
    gradients of the next step in place."""
    opt = esgdm.ESGDM(params, lr=0.3, backend=backend, seed=5, d_warmup=1, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(params).backward(create_graph=opt.should_create_graph())
        opt.step()
    opt.zero_grad()
    loss_of(params).backward(create_graph=opt.should_create_graph())
    return opt


def make_params(shapes_dtypes):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(d).requires_grad_() for s, d in shapes_dtypes]


def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            copy.deepcopy(opt.state_dict()),
            (opt.steps, opt.steps_since_d),
            torch.get_rng_state())


def assert_unchanged(before, after):
    (pa, sa, ca, ra), (pb, sb, cb, rb) = before, after
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"parameter {i} changed"
    assert sa["global_state"] == sb["global_state"]
    assert sa["state"].keys() == sb["state"].keys()
    for k, entry in sa["state"].items():
        for key, v in entry.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][k][key])), (k, key)
    assert ca == cb, "counters changed"
    assert torch.equal(ra, rb), "the global RNG was consumed"


def two_buckets():
    # parameters 0 and 2 share a (device, dtype) bucket, parameter 1 is alone in another
    return make_params([((8,), torch.float32), ((5,), torch.bfloat16), ((8,), torch.float32)])


# Each: (make parameters, break the gradients, error message)
BAD_GRADIENTS = {
    "shape": (lambda: make_params([((8,), torch.float32)]),
              lambda ps: setattr(ps[0].grad, "data", torch.ones(1, device=ps[0].device)),
              r"gradient of parameter 0 in group 0 has shape \(1,\), parameter has shape \(8,\)"),
    "dtype": (lambda: make_params([((8,), torch.float32)]),
              lambda ps: setattr(ps[0].grad, "data", ps[0].grad.data.double()),
              "gradient of parameter 0 in group 0 has dtype torch.float64, parameter has dtype torch.float32"),
    "last_of_two_buckets": (two_buckets,
                            lambda ps: setattr(ps[2].grad, "data", torch.ones(3, device=ps[2].device)),
                            r"gradient of parameter 2 in group 0 has shape \(3,\), parameter has shape \(8,\)"),
    "missing_and_wrong": (two_buckets,
                          lambda ps: (setattr(ps[0], "grad", None), setattr(ps[2].grad, "data", torch.ones(2, 4))),
                          r"gradient of parameter 2 in group 0 has shape \(2, 4\), parameter has shape \(8,\)"),
    "other_2d_shape": (lambda: make_params([((2, 4), torch.float32)]),
                                 lambda ps: setattr(ps[0].grad, "data", torch.ones(4, 2).t()[:, :2].contiguous()),
                                 r"gradient of parameter 0 in group 0 has shape \(2, 2\), "
                                 r"parameter has shape \(2, 4\)"),
    "sparse": (two_buckets,
               lambda ps: setattr(ps[1], "grad", ps[1].grad.detach().to_sparse()),
               "gradient of parameter 1 in group 0 is sparse .*does not support sparse gradients"),
    "negated_view": (lambda: make_params([((8,), torch.float32)]),
                     lambda ps: setattr(ps[0], "grad", ps[0].grad.detach().clone()._neg_view()),
                     "gradient of parameter 0 in group 0 is a negated view"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_GRADIENTS))
def test_bad_gradient_is_refused_before_any_write(backend, case, frontend):
    make, spoil, message = BAD_GRADIENTS[case]
    ps = make()
    twin_ps = [p.detach().clone().requires_grad_() for p in ps]
    opt, twin = trained(backend, ps), trained(backend, twin_ps)
    assert not opt.is_d_step()  # a plain step: nothing else can fail first
    spoil(ps)
    before = snapshot(opt, ps)
    with pytest.raises(Exception) as error:
        opt.step()
    assert_unchanged(before, snapshot(opt, ps))  # first: no bucket was written
    assert error.type is RuntimeError and re.search(message, str(error.value)), error.value
    # nothing hidden changed: the next valid step is the twin's, bit for bit
    for o, qs in ((opt, ps), (twin, twin_ps)):
        o.zero_grad()
        loss_of(qs).backward(create_graph=o.should_create_graph())
        o.step()
    for a, b in zip(ps, twin_ps):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_group_is_named(backend, frontend):
    ps = make_params([((3,), torch.float32), ((4,), torch.float32), ((6,), torch.float32)])
    opt = esgdm.ESGDM([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.1}], backend=backend)
    for p in ps:
        p.grad = torch.ones_like(p)
    ps[2].grad.data = torch.ones(7)
    with pytest.raises(RuntimeError, match=r"gradient of parameter 1 in group 1 has shape \(7,\), "
                                           r"parameter has shape \(6,\)"):
        opt.step()
    assert opt.steps == 0 and not opt.state


# Gradients laid out unlike their parameter: stepped as their contiguous copies.
ODD_LAYOUTS = {
    "expanded": lambda g: g.new_ones(1, g.shape[1]).mul_(0.5).expand(g.shape),
    "transposed": lambda g: g.t().contiguous().t(),
    "sliced": lambda g: torch.stack([g, -g], dim=-1)[..., 0],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["expanded", "transposed", "sliced"])
def test_gradient_with_other_layout_equals_contiguous_copy(backend, layout, frontend):
    ps = make_params([((4, 6), torch.float32), ((3,), torch.float32)])
    twin_ps = [p.detach().clone().requires_grad_() for p in ps]
    opt, twin = trained(backend, ps), trained(backend, twin_ps)
    odd = ODD_LAYOUTS[layout](ps[0].grad.detach())
    assert not odd.is_contiguous()
    ps[0].grad = odd
    twin_ps[0].grad = odd.contiguous()
    opt.step()
    twin.step()
    for a, b in zip(ps, twin_ps):
        assert torch.equal(a, b)
    assert torch.equal(opt.state[ps[0]]["exp_avg"], twin.state[twin_ps[0]]["exp_avg"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_with_other_layout_keeps_its_graph_on_a_d_step(backend, frontend):
    """The copy that lines a transposed gradient up with its state is differentiated on
    an autograd D-step: it used to be made without a graph, so that tensor's
    Hessian-vector product was silently taken as zero."""
    ps = make_params([((4, 6), torch.float32), ((3,), torch.float32)])
    twin_ps = [p.detach().clone().requires_grad_() for p in ps]
    runs = []
    for qs, relayout in ((ps, True), (twin_ps, False)):
        opt = esgdm.ESGDM(qs, lr=0.3, backend=backend, seed=5)
        opt.zero_grad()
        loss_of(qs).backward(create_graph=True)
        if relayout:
            qs[0].grad = qs[0].grad.t().contiguous().t()  # the same values, with a graph
            assert qs[0].grad.grad_fn is not None and not qs[0].grad.is_contiguous()
        opt.step()
        runs.append(opt)
    assert runs[1].state[twin_ps[0]]["exp_avg_d"].min() > 0  # x**4 + x**2 has curvature everywhere
    for a, b in zip(ps, twin_ps):
        assert torch.equal(a, b)
        assert torch.equal(runs[0].state[a]["exp_avg_d"], runs[1].state[b]["exp_avg_d"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_finite_difference_hvp_is_refused_before_any_write(backend, frontend):
    """The closure's second gradient (the finite-difference probe) comes back in another
    dtype: the Hessian-vector products are checked before any bucket is written."""
    ps = two_buckets()
    opt = esgdm.ESGDM(ps, lr=0.3, backend=backend, seed=5, hvp="finite_difference", d_warmup=3)
    calls = [0]

    def closure(spoil=False):
        calls[0] += 1
        opt.zero_grad()
        loss = loss_of(ps)
        loss.backward()
        if spoil and calls[0] == 2:  # the probe's gradient
            ps[2].grad.data = ps[2].grad.data.double()
        return loss

    opt.step(closure)
    before = snapshot(opt, ps)
    calls[0] = 0
    with pytest.raises(RuntimeError, match="Hessian-vector product of parameter 2 in group 0 has dtype "
                                           "torch.float64, parameter has dtype torch.float32"):
        opt.step(lambda: closure(spoil=True))
    assert_unchanged(before, snapshot(opt, ps))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["sparse", "negated"])
def test_parameter_that_became_unsteppable_is_refused(backend, bad):
    ps = make_params([((8,), torch.float32), ((3,), torch.float32)])
    opt = trained(backend, ps)
    before = [p.detach().clone() for p in ps]
    if bad == "sparse":
        with pytest.raises(RuntimeError):  # torch itself refuses p.data = <sparse>
            ps[0].data = ps[0].data.to_sparse()
        return
    ps[0].data = ps[0].data.clone()._neg_view()
    with pytest.raises(ValueError, match="a negated view"):
        opt.step()
    ps[0].data = ps[0].data.resolve_neg()
    assert torch.equal(ps[1], before[1])


# ------------------------------------------------------------ the operator itself


def op_args(kernel, n=2, numel=8):
    """Valid arguments of esgdm::step_ for ``n`` float32 tensors (a plain step)."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(numel, generator=g) for _ in range(n)]
    grads = [torch.randn(numel, generator=g) for _ in range(n)]
    exp_avgs = [torch.zeros(numel) for _ in range(n)]
    exp_avg_ds = [torch.rand(numel, generator=g) for _ in range(n)]
    scalars = torch.tensor([[0.9, 0.5, 3.0, 0.0]] * n, dtype=torch.float64)
    index = torch.tensor([[i, 0] for i in range(n)], dtype=torch.int32)
    hparams = torch.tensor([[0.1, 0.9, 0.999, 0.99, 1e-4, 0.0]], dtype=torch.float64)
    return dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_ds=exp_avg_ds, hvps=None,
                scalars=scalars, index=index, hparams=hparams, grad_scale=None, found_inf=None,
                flags=0, seed=0, kernel=kernel)


# Each: (break the arguments, the message, whether the dispatcher reaches our check:
# it refuses sparse tensors and None itself, resolves negated views, and sends a call
# with a meta tensor to the fake implementation, which touches nothing).
BAD_OP_ARGS = {
    "grad_shape": (lambda a: a["grads"].__setitem__(1, torch.ones(1)), r"grads\[1\] has shape \(1,\)", True),
    "grad_dtype": (lambda a: a["grads"].__setitem__(0, a["grads"][0].double()),
                   r"grads\[0\] has dtype torch.float64", True),
    "grad_expanded": (lambda a: a["grads"].__setitem__(0, torch.ones(1).expand(8)),
                      r"grads\[0\] has strides \(0,\)", True),
    "state_shape": (lambda a: a["exp_avg_ds"].__setitem__(1, torch.zeros(9)),
                    r"exp_avg_ds\[1\] has shape \(9,\)", True),
    "slot_out_of_range": (lambda a: a["index"].__setitem__((1, 0), 99),
                          r"index\[1, 0\] = 99 is not a row of scalars \(2 rows\)", True),
    "negative_slot": (lambda a: a["index"].__setitem__((0, 0), -1),
                      r"index\[0, 0\] = -1 is not a row of scalars", True),
    "group_out_of_range": (lambda a: a["index"].__setitem__((0, 1), 1),
                           r"index\[0, 1\] = 1 is not a row of hparams \(1 rows\)", True),
    "grad_meta": (lambda a: a["grads"].__setitem__(1, torch.ones(8, device="meta")), r"grads\[1\] is on meta", False),
    "grad_sparse": (lambda a: a["grads"].__setitem__(1, a["grads"][1].to_sparse()),
                    r"grads\[1\] is a torch.sparse_coo tensor", False),
    "param_sparse": (lambda a: a["params"].__setitem__(1, a["params"][1].to_sparse()),
                     r"params\[1\] is a torch.sparse_coo", False),
    "grad_none": (lambda a: a["grads"].__setitem__(0, None), r"grads\[0\] is a NoneType", False),
    "grad_negated": (lambda a: a["grads"].__setitem__(0, a["grads"][0]._neg_view()),
                     r"grads\[0\] is a negated view", False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", list(BAD_OP_ARGS))
def test_operator_refuses_bad_arguments_before_any_write(backend, bad):
    args = op_args(backend)
    spoil, message, dispatched = BAD_OP_ARGS[bad]
    spoil(args)
    written = ("params", "exp_avgs", "exp_avg_ds", "scalars")
    before = {k: [t.clone() for t in v] if isinstance(v, list) else [v.clone()] for k, v in args.items()
              if k in written}
    calls = [ops.step_] + ([lambda **a: torch.ops.esgdm.step_(*a.values())] if dispatched else [])
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call(**args)
        for k, old in before.items():
            now = args[k] if isinstance(args[k], list) else [args[k]]
            for a, b in zip(old, now):
                if a.layout == torch.strided and a.device.type == "cpu":
                    assert torch.equal(a, b), f"{k} was written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_index_written_after_a_valid_call_is_checked_again(backend):
    """The index bounds are remembered only until the table is written to."""
    args = op_args(backend)
    ops.step_(**args)
    args["index"][1, 0] = 5
    with pytest.raises(ValueError, match=r"index\[1, 0\] = 5 is not a row of scalars"):
        ops.step_(**args)


# ------------------------------------------------------------ on a GPU


def _cuda_backend(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = backends.get(name).why_not(torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("case", ["shape", "dtype", "last_of_two_buckets"])
def test_bad_gradient_is_refused_on_cuda(backend, case):
    _cuda_backend(backend)
    make, spoil, message = BAD_GRADIENTS[case]
    ps = [p.detach().cuda().requires_grad_() for p in make()]
    opt = trained(backend, ps)
    spoil(ps)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["triton", "cuda", "torch"])
def test_operator_checks_index_values_on_cuda_and_during_capture(kernel):
    """A CUDA index table is read once (one sync) and remembered; during graph capture
    a table never checked is refused rather than read."""
    _cuda_backend(kernel)
    args = op_args(kernel)
    for key, value in list(args.items()):
        if isinstance(value, list):
            args[key] = [t.cuda() for t in value]
        elif isinstance(value, torch.Tensor):
            args[key] = value.cuda()
    args["index"][1, 0] = 99
    with pytest.raises(ValueError, match=r"index\[1, 0\] = 99 is not a row of scalars"):
        ops.step_(**args)
    args["index"][1, 0] = 1
    ops.step_(**args)  # read once, remembered
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.step_(**args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.step_(**args)  # no read of a remembered table
    graph.replay()
    args["index"] = args["index"].clone()  # never checked
    with pytest.raises(ValueError, match="during CUDA graph capture"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        ops.step_(**args)
    torch.cuda.synchronize()
