"""The compiled backends ("cpu" and "cuda", extension esgdm._C) against the "torch" backend.

The CPU kernel runs in every test run: a missing extension fails these tests unless
the build was skipped on purpose (ESGDM_BUILD_EXTENSION=0).  The CUDA kernel is
checked for being compiled and registered wherever it was built (always in CI, which
sets ESGDM_REQUIRE_CUDA_EXT=1); comparisons that run it need a GPU.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import esgdm
from esgdm import backends
from esgdm.backends import cpp_impl, torch_impl
from helpers import clone_params, make_coeffs, rel_err, separable_loss

OP = "esgdm::fused_step_"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Kernel vs the "torch" backend after one step, on values of order 1: float32 and
# float64 differ only by fused multiply-adds; low-precision parameters are rounded
# once from float32 values that agree to ~1e-6, so they may differ by one unit in the
# last place.
P_TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-13),
         torch.bfloat16: (2 ** -7, 1e-6), torch.float16: (2 ** -10, 1e-6)}
STATE_TOL = {torch.float32: (1e-6, 1e-7), torch.float64: (1e-13, 1e-15)}

# Sizes around the CPU kernel's 65536-element chunks and the CUDA kernel's tiles.
SIZES = [0, 1, 2, 3, 5, 17, 1023, 1025, 4097, 65535, 70001, 200_003]


def _build_skipped() -> bool:
    return os.environ.get("ESGDM_BUILD_EXTENSION", "").strip().lower() in ("0", "false", "no", "off")


@pytest.fixture
def ext():
    """The loaded extension; a missing one fails the test unless its build was skipped."""
    if cpp_impl._C is None:
        if _build_skipped():
            pytest.skip(f"ESGDM_BUILD_EXTENSION=0: {cpp_impl.LOAD_ERROR}")
        pytest.fail(cpp_impl.LOAD_ERROR)
    return cpp_impl._C


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar_rows(n, gen):
    """Per-tensor rows (beta1, beta2, eps, step_scale, decay), varied across tensors:
    beta1 below 0.5 takes the other side of the lerp formula, beta1 = 0 and beta2 = 1
    are the ends of their ranges, decay != 1 is weight decay."""
    choices = [
        (0.9, 0.999, 1e-4, 0.3, 1.0),
        (0.3, 0.5, 0.0, 1.7, 0.99),
        (0.0, 1.0, 1e-8, 0.05, 1.0),
        (0.99, 0.9, 1e-2, 0.8, 0.9),
    ]
    pick = torch.randint(0, len(choices), (n,), generator=gen).tolist()
    return torch.tensor([choices[k] for k in pick], dtype=torch.float64).reshape(n, 5)


def _inputs(sizes, dtype, d_step, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    sd = _state_dtype(dtype)

    def rand(n, dt, positive=False):
        t = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05 if positive else \
            torch.randn(n, generator=gen, dtype=torch.float64)
        return t.to(device=device, dtype=dt)

    ps = [rand(n, dtype) for n in sizes]
    gs = [rand(n, dtype) for n in sizes]
    ms = [rand(n, sd) for n in sizes]
    ds = [rand(n, sd, positive=True) for n in sizes]
    hs = [rand(n, dtype) for n in sizes] if d_step else None
    return ps, gs, ms, ds, hs, _scalar_rows(len(sizes), gen)


def _clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def _run_both(backend, ps, gs, ms, ds, hs, scalars):
    """Steps copies of the inputs with ``backend`` and with the "torch" backend."""
    got = (_clone(ps), _clone(ms), _clone(ds))
    want = (_clone(ps), _clone(ms), _clone(ds))
    backend.step(got[0], gs, got[1], got[2], hs, scalars)
    torch_impl.BACKEND.step(want[0], gs, want[1], want[2], hs, scalars)
    return got, want


def _assert_lists_close(got, want, dtype, what):
    rtol, atol = P_TOL[dtype] if what == "params" else STATE_TOL[_state_dtype(dtype)]
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what}[{i}] (numel {a.numel()}): {m}")


# ------------------------------------------------------------------ build and registration


def test_extension_imports_and_registers_the_cpu_op(ext):
    info = cpp_impl.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "cuda_version", "cpu_isa", "openmp", "compiler"}
    assert info["openmp"], "the CPU kernel must be built with OpenMP to use both cores"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "Meta")
    assert "C++ kernel" in cpp_impl.CPU_BACKEND.describe()


def test_cuda_op_is_compiled_and_registered(ext):
    """Runs unconditionally under ESGDM_REQUIRE_CUDA_EXT=1 (CI, which has nvcc but no GPU)."""
    info = cpp_impl.build_info()
    required = os.environ.get("ESGDM_REQUIRE_CUDA_EXT", "").strip() == "1"
    if not required and not info["cuda"]:
        pytest.skip("esgdm._C was built without its CUDA kernel "
                    f"(torch CUDA build: {torch.version.cuda or 'no'})")
    assert info["cuda"], "ESGDM_REQUIRE_CUDA_EXT=1 but esgdm._C was built without CUDA"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")
    archs = cpp_impl.cuda_archs(info)
    assert archs and all(a.startswith(("sm_", "compute_")) for a in archs), archs
    # What we asked nvcc for agrees with the virtual architectures nvcc says it compiled.
    asked = {int(a.split("_")[1].rstrip("af")) * 10 for a in archs}
    compiled = {int(x) for x in info["cuda_arch_list"].split(",") if x}
    assert asked == compiled, (archs, info["cuda_arch_list"])
    assert info["cuda_version"].split(".")[0].isdigit()
    description = cpp_impl.CUDA_BACKEND.describe()
    assert all(a in description for a in archs), description


def test_schema_matches_the_triton_op(ext):
    ops = pytest.importorskip("esgdm.ops")
    schema = getattr(ops, "STEP_SCHEMA", None)
    if schema is None:
        pytest.skip("esgdm.ops has no STEP_SCHEMA")
    expected = torch._C.parse_schema(OP + schema)
    assert str(torch.ops.esgdm.fused_step_.default._schema) == str(expected)


def test_auto_picks_the_cpu_kernel_for_cpu_buckets(ext):
    for dtype in DTYPES:
        backend, note = backends.resolve("auto", torch.device("cpu"), dtype)
        assert backend is cpp_impl.CPU_BACKEND and note is None, (dtype, note)


def test_cuda_backend_refuses_cpu_and_cpu_backend_refuses_cuda(ext):
    assert "cuda tensors only" in cpp_impl.CUDA_BACKEND.why_not(torch.device("cpu"), torch.float32)
    assert "cpu tensors only" in cpp_impl.CPU_BACKEND.why_not(torch.device("cuda"), torch.float32)
    assert "not torch.int32" in cpp_impl.CPU_BACKEND.why_not(torch.device("cpu"), torch.int32)
    with pytest.raises(backends.BackendUnavailableError, match="cuda tensors only"):
        esgdm.ESGDM([torch.zeros(3, requires_grad=True)], backend="cuda").buckets()


@pytest.mark.parametrize("archs,capability,ok", [
    (["sm_80"], (8, 0), True), (["sm_80"], (8, 6), True), (["sm_80"], (9, 0), False),
    (["sm_75", "sm_80"], (7, 0), False), (["compute_90"], (10, 0), True),
    (["compute_90"], (8, 9), False), (["sm_90a"], (9, 0), True), (["sm_90a"], (9, 1), False),
    (["sm_75", "sm_80", "compute_90", "sm_90"], (12, 0), True), ([], (9, 0), False),
])
def test_which_gpus_a_build_runs_on(archs, capability, ok):
    assert cpp_impl.runs_on(archs, capability) is ok


# ------------------------------------------------------------------ a missing extension


def test_missing_extension_is_reported_once_and_auto_falls_back(monkeypatch):
    module, reason = cpp_impl.load_extension("esgdm._no_such_extension")
    assert module is None and reason.startswith("esgdm._no_such_extension was not built")
    monkeypatch.setattr(cpp_impl, "_C", None)
    monkeypatch.setattr(cpp_impl, "LOAD_ERROR", reason)
    monkeypatch.setattr(backends, "_warned", set())

    def step(opt_backend):
        p = torch.randn(4, requires_grad=True)
        opt = esgdm.ESGDM([p], lr=0.1, d_warmup=1, backend=opt_backend)
        opt.steps = opt.steps_since_d = 1  # a plain step: no graph needed
        p.grad = torch.randn(4)
        opt.step()
        return opt

    with pytest.warns(RuntimeWarning, match="using 'torch' because 'cpu' cannot run "
                                            r"\(esgdm._no_such_extension was not built"):
        opt = step("auto")
    assert opt.backend_for(opt.buckets()[0]).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step("auto")  # said once only
    with pytest.raises(backends.BackendUnavailableError, match="was not built"):
        step("cpu")


# ------------------------------------------------------------------ the CPU kernel


@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "d_step"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_matches_torch_backend(ext, dtype, d_step):
    ps, gs, ms, ds, hs, scalars = _inputs(SIZES, dtype, d_step)
    (p1, m1, d1), (p2, m2, d2) = _run_both(cpp_impl.CPU_BACKEND, ps, gs, ms, ds, hs, scalars)
    _assert_lists_close(p1, p2, dtype, "params")
    _assert_lists_close(m1, m2, dtype, "exp_avgs")
    _assert_lists_close(d1, d2, dtype, "exp_avg_ds")
    if not d_step:  # a plain step leaves D alone
        for a, b in zip(d1, ds):
            assert torch.equal(a, b)
    # every element moved
    assert all(not torch.equal(a, b) for a, b in zip(p1, ps) if a.numel())


def test_cpu_kernel_propagates_nan_like_torch(ext):
    ps, gs, ms, ds, hs, scalars = _inputs([9, 33], torch.float32, True)
    hs[0][3] = float("nan")
    gs[1][5] = float("nan")
    (p1, m1, d1), (p2, m2, d2) = _run_both(cpp_impl.CPU_BACKEND, ps, gs, ms, ds, hs, scalars)
    assert torch.isnan(d1[0][3]) and torch.isnan(p1[0][3]) and torch.isnan(m1[1][5])
    _assert_lists_close(p1, p2, torch.float32, "params")
    _assert_lists_close(d1, d2, torch.float32, "exp_avg_ds")


def test_cpu_kernel_result_does_not_depend_on_thread_count(ext):
    ps, gs, ms, ds, hs, scalars = _inputs([1, 300_001, 7, 150_000], torch.float32, True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p, m, d = _clone(ps), _clone(ms), _clone(ds)
            cpp_impl.CPU_BACKEND.step(p, gs, m, d, hs, scalars)
            results.append(p + m + d)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_cpu_kernel_on_dense_non_contiguous_tensors(ext, layout):
    """Dense permuted tensors are walked as flat memory, state laid out the same way."""
    def make(dt, gen):
        t = torch.randn(6, 5, 4, 3, generator=gen, dtype=torch.float64).to(dt)
        return t.transpose(0, 3) if layout == "transposed" else t.to(memory_format=torch.channels_last)

    gen = torch.Generator().manual_seed(3)
    ps, gs, hs = (make(torch.float32, gen) for _ in range(3))
    ms, ds = make(torch.float32, gen), make(torch.float32, gen).abs()
    assert not ps.is_contiguous()
    scalars = _scalar_rows(1, gen)
    (p1, m1, d1), (p2, m2, d2) = _run_both(cpp_impl.CPU_BACKEND, [ps], [gs], [ms], [ds], [hs], scalars)
    _assert_lists_close(p1, p2, torch.float32, "params")
    _assert_lists_close(m1, m2, torch.float32, "exp_avgs")
    assert p1[0].stride() == ps.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_optimizer_with_cpu_backend_follows_torch_backend(ext, dtype):
    """Whole optimizer, 25 steps of D-steps and plain steps: odd sizes, 0- and 1-element,
    transposed, channels-last and non-dense parameters, one missing its gradient."""
    def params():
        g = torch.Generator().manual_seed(11)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        return [
            r(37).to(dtype).requires_grad_(),
            r(0).to(dtype).requires_grad_(),
            r(1).to(dtype).requires_grad_(),
            r(5, 7).to(dtype).t().requires_grad_(),
            r(2, 3, 4, 5).to(dtype).to(memory_format=torch.channels_last).requires_grad_(),
            r(6, 10).to(dtype)[:, ::2].requires_grad_(),   # not dense
            r(1000, 3).to(dtype).requires_grad_(),
            r(9).to(dtype).requires_grad_(),              # loses its gradient on some steps
        ]

    ps, qs = params(), params()
    coeffs = make_coeffs(ps)
    kw = dict(lr=0.2, update_d_every=4, d_warmup=5, weight_decay=0.01)
    opt = esgdm.ESGDM(ps, backend="cpu", **kw)
    ref = esgdm.ESGDM(qs, backend="torch", **kw)
    for t in range(25):
        for o, group in ((opt, ps), (ref, qs)):
            o.zero_grad(set_to_none=True)
            separable_loss(group, coeffs).backward(create_graph=o.should_create_graph())
            if t % 3 == 1:
                group[-1].grad = None
            o.step()
    assert opt.backend_for(opt.buckets()[0]) is cpp_impl.CPU_BACKEND
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert p.stride() == q.stride()
        assert rel_err(p, q) <= tol, f"param {i}: {rel_err(p, q):.3g}"
        for key in ("exp_avg", "exp_avg_d"):
            if p in opt.state:
                assert rel_err(opt.state[p][key], ref.state[q][key]) <= max(tol, 1e-5), (i, key)


def test_profiler_shows_one_op_per_bucket(ext):
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (5, 300, 1)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = esgdm.ESGDM(ps, d_warmup=1, backend="cpu")
    opt.steps = opt.steps_since_d = 1  # a plain step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    calls = [e for e in prof.key_averages() if e.key == OP]
    assert len(calls) == 1 and calls[0].count == 1


# ------------------------------------------------------------------ bad input


def _good_args(n=2):
    ps, gs, ms, ds, hs, scalars = _inputs([4] * n, torch.float32, True)
    return [ps, gs, ms, ds, hs, scalars]


@pytest.mark.parametrize("break_it,message", [
    (lambda a: a[1].pop(), "got 2 params but 1 grads"),
    (lambda a: a[4].pop(), "got 2 params but 1 hvps"),
    (lambda a: a.__setitem__(5, a[5].float()), "scalars must be float64, got Float"),
    (lambda a: a.__setitem__(5, a[5][:1]), r"scalars must have shape \[2, 5\]"),
    (lambda a: a[2].__setitem__(1, a[2][1].double()), r"exp_avgs\[1\] has dtype Double, expected Float"),
    (lambda a: a[1].__setitem__(0, torch.randn(5)), r"grads\[0\] has shape \[5\]"),
    (lambda a: a[0].__setitem__(1, torch.randn(4).half()), r"params\[1\] has dtype Half but params\[0\] has Float"),
    (lambda a: a[0].__setitem__(0, torch.randn(8)[::2]), r"params\[0\] .* is not dense"),
    (lambda a: [a[i].__setitem__(0, torch.zeros(4, dtype=torch.int32)) for i in (0, 1, 4)],
     "parameters must be float32, float64, float16 or bfloat16, got Int"),
])
def test_bad_arguments_raise_naming_the_problem(ext, break_it, message):
    args = _good_args()
    break_it(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.esgdm.fused_step_(*args)


def test_mismatched_strides_raise(ext):
    args = _good_args(1)
    p = torch.randn(3, 4)
    args[0] = [p]
    args[1] = [torch.randn(4, 3).t()]
    args[2] = [torch.zeros(3, 4)]
    args[3] = [torch.zeros(3, 4)]
    args[4] = None
    with pytest.raises(RuntimeError, match=r"grads\[0\] has strides \[1, 3\] but its parameter has strides \[4, 1\]"):
        torch.ops.esgdm.fused_step_(*args)


def test_meta_kernel_checks_and_writes_nothing(ext):
    args = _good_args()
    meta = [[t.to("meta") for t in lst] if isinstance(lst, list) else lst for lst in args[:5]]
    torch.ops.esgdm.fused_step_(*meta, args[5])
    meta[1].pop()
    with pytest.raises(RuntimeError, match="but 1 grads"):
        torch.ops.esgdm.fused_step_(*meta, args[5])


def test_empty_bucket_is_a_no_op(ext):
    torch.ops.esgdm.fused_step_([], [], [], [], None, torch.zeros(0, 5, dtype=torch.float64))


# ------------------------------------------------------------------ the CUDA kernel (GPU)


def _cuda_ready():
    reason = cpp_impl.CUDA_BACKEND.why_not(torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.fail(f"the 'cuda' backend cannot run on this GPU: {reason}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "d_step"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_cuda_kernel_matches_torch_backend(ext, dtype, d_step, offset):
    _cuda_ready()
    sizes = SIZES + [3_000_001]
    ps, gs, ms, ds, hs, scalars = _inputs(sizes, dtype, d_step, device="cuda")
    if offset:  # views one element into their storage: the element-wise path
        shift = lambda ts: None if ts is None else [
            torch.cat([t.new_zeros(1), t])[1:] for t in ts]
        ps, gs, hs = shift(ps), shift(gs), shift(hs)
        assert ps[-1].data_ptr() % 16 != 0
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the kernel must run on the current stream
        stream.wait_stream(torch.cuda.default_stream())
        (p1, m1, d1), (p2, m2, d2) = _run_both(cpp_impl.CUDA_BACKEND, ps, gs, ms, ds, hs, scalars)
    torch.cuda.synchronize()
    _assert_lists_close(p1, p2, dtype, "params")
    _assert_lists_close(m1, m2, dtype, "exp_avgs")
    _assert_lists_close(d1, d2, dtype, "exp_avg_ds")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_with_many_small_tensors_and_cpu_kernel_agree(ext):
    _cuda_ready()
    sizes = [int(s) for s in torch.randint(1, 3000, (500,))]
    ps, gs, ms, ds, hs, scalars = _inputs(sizes, torch.float32, True)
    (p1, m1, d1), _ = _run_both(cpp_impl.CPU_BACKEND, ps, gs, ms, ds, hs, scalars)
    cuda = lambda ts: [t.cuda() for t in ts]
    p2, m2, d2 = cuda(ps), cuda(ms), cuda(ds)
    cpp_impl.CUDA_BACKEND.step(p2, cuda(gs), m2, d2, cuda(hs), scalars)
    _assert_lists_close([t.cpu() for t in p2], p1, torch.float32, "params")
    _assert_lists_close([t.cpu() for t in d2], d1, torch.float32, "exp_avg_ds")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_optimizer_with_cuda_backend_follows_torch_backend(ext):
    _cuda_ready()
    g = torch.Generator().manual_seed(5)
    make = lambda: [torch.randn(s, generator=g).cuda().requires_grad_() for s in [(1,), (37,), (300, 7), (0,)]]
    ps = make()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    coeffs = [tuple(c.cuda() for c in cs) for cs in make_coeffs(ps)]
    opt = esgdm.ESGDM(ps, lr=0.2, update_d_every=3, backend="cuda")
    ref = esgdm.ESGDM(qs, lr=0.2, update_d_every=3, backend="torch")
    for _ in range(30):
        for o, group in ((opt, ps), (ref, qs)):
            o.zero_grad(set_to_none=True)
            separable_loss(group, coeffs).backward(create_graph=o.should_create_graph())
            o.step()
    for p, q in zip(ps, qs):
        assert rel_err(p, q) <= 1e-5


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_indexes_past_2_to_the_31(ext):
    """A bfloat16 tensor of 2^31 + 4099 elements (24 GiB with its state)."""
    _cuda_ready()
    n = 2 ** 31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with 40 GiB")
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    m = torch.randn(n, device="cuda", generator=gen)
    d = torch.rand(n, device="cuda", generator=gen)
    scalars = torch.tensor([[0.9, 0.999, 1e-4, 0.3, 0.99]], dtype=torch.float64)
    ends = [slice(0, 5000), slice(2 ** 31 - 3000, 2 ** 31 + 3000), slice(n - 5000, n)]
    want = []
    for s in ends:
        pw, mw, dw = p[s].clone(), m[s].clone(), d[s].clone()
        torch_impl.BACKEND.step([pw], [g[s]], [mw], [dw], None, scalars)
        want.append((pw, mw))
    cpp_impl.CUDA_BACKEND.step([p], [g], [m], [d], None, scalars)
    for s, (pw, mw) in zip(ends, want):
        torch.testing.assert_close(p[s], pw, rtol=2 ** -7, atol=1e-6)
        torch.testing.assert_close(m[s], mw, rtol=1e-6, atol=1e-7)
