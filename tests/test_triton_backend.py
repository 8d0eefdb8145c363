"""The fused Triton backend against the "torch" backend (the reference kernel).

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernel).  GPU tests are marked and run
the same comparisons on CUDA, plus a bucket of more than 2**31 elements.

Tolerances, per step (each step starts both backends from the same state):

* float32 parameters: every output within 1e-6 relative to the magnitude of the terms
  that produced it (|p| + |p - p_new| for p, |m| + |g| for m, |D| for D);
* bfloat16/float16 parameters: p within one ulp of the parameter dtype (the
  interpreter truncates bf16 casts where the GPU rounds), the float32 state as above.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from esgdm import backends  # noqa: E402
from esgdm.backends import BackendUnavailableError  # noqa: E402
from esgdm.backends.torch_impl import torch_step  # noqa: E402
from esgdm.buckets import Bucket  # noqa: E402
import esgdm  # noqa: E402
import esgdm.ops as ops  # noqa: E402
from esgdm.kernels import esgdm_step as K  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# CPU runs need the interpreter; on a GPU machine the kernel is compiled instead.
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
    not K.INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before the kernels are imported"))]
DEVICES.append(pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda]))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes around the small test block (32) and the default one, and the edge cases.
SIZES = [0, 1, 2, 3, 5, 31, 32, 33, 63, 64, 65, 100, 257, 7, 1]


# ----------------------------------------------------------------- helpers

def _scalars(n: int, seed: int = 0) -> torch.Tensor:
    """A scalar table with different hyper-parameters per tensor (rule.SCALAR_COLUMNS)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    beta1 = torch.where(u[:, 0] < 0.2, 0.3 * u[:, 0], 0.8 + 0.19 * u[:, 0])  # both lerp branches
    beta2 = 0.99 + 0.01 * u[:, 1]
    eps = 10 ** (-2 - 4 * u[:, 2])
    step_scale = 0.05 + u[:, 3]
    decay = torch.where(u[:, 4] < 0.3, torch.ones_like(u[:, 4]), 1 - 0.01 * u[:, 4])
    return torch.stack([beta1, beta2, eps, step_scale, decay], dim=1)


def _make(sizes, dtype, device, d_step, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randn(n, generator=g)  # noqa: E731
    ps = [rnd(n).to(device, dtype) for n in sizes]
    gs = [rnd(n).to(device, dtype) for n in sizes]
    hs = [(3 * rnd(n)).to(device, dtype) for n in sizes] if d_step else None
    ms = [rnd(n).to(device) for n in sizes]
    ds = [rnd(n).square().to(device) for n in sizes]
    return ps, gs, ms, ds, hs


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of ``x``'s dtype at |x| (as float32)."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).float()


def _check_step(ps0, gs, ms0, ds0, p_out, m_out, d_out, p_ref, m_ref, d_ref, dtype):
    """Asserts the per-step tolerances of the module docstring, tensor by tensor."""
    cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731 - compare on the host
    ps0, gs, ms0, ds0, p_out, m_out, d_out, p_ref, m_ref, d_ref = map(
        cpu, (ps0, gs, ms0, ds0, p_out, m_out, d_out, p_ref, m_ref, d_ref))
    for i in range(len(ps0)):
        if ps0[i].numel() == 0:
            continue
        p0, pr, po = ps0[i].float(), p_ref[i].float(), p_out[i].float()
        mr, mo = m_ref[i], m_out[i]
        dr, do = d_ref[i], d_out[i]
        tol_m = 1e-6 * (ms0[i].abs() + gs[i].float().abs()) + 1e-30
        assert ((mo - mr).abs() <= tol_m).all(), f"m of tensor {i}: max err {(mo - mr).abs().max()}"
        assert ((do - dr).abs() <= 1e-6 * dr.abs() + 1e-30).all(), f"D of tensor {i}"
        if dtype == torch.float32:
            tol_p = 1e-6 * (p0.abs() + (p0 - pr).abs()) + 1e-30
        else:
            tol_p = _ulp(p_ref[i])
        err = (po - pr).abs()
        assert (err <= tol_p).all(), (
            f"p of tensor {i} ({dtype}): max err {err.max().item()} at {err.argmax().item()}")


def _compare(device, dtype, sizes, d_step, steps=2, block=None, hints=True, via_op=False):
    """Runs ``steps`` steps of the Triton kernel and of torch_step from equal states."""
    ps, gs, ms, ds, hs = _make(sizes, dtype, device, d_step)
    scalars = _scalars(len(sizes))
    for step in range(steps):
        p_ref, m_ref, d_ref = [p.clone() for p in ps], [m.clone() for m in ms], [d.clone() for d in ds]
        torch_step(p_ref, gs, m_ref, d_ref, hs, scalars)
        p0, m0, d0 = [p.clone() for p in ps], [m.clone() for m in ms], [d.clone() for d in ds]
        if via_op:
            torch.ops.esgdm.triton_step_(ps, gs, ms, ds, hs, scalars)
        else:
            K.fused_step(ps, gs, ms, ds, hs, scalars, block=block, hints=hints)
        _check_step(p0, gs, m0, d0, ps, ms, ds, p_ref, m_ref, d_ref, dtype)
        # next step from the reference state, with new gradients
        for t, r in zip(ps + ms + ds, p_ref + m_ref + d_ref):
            t.copy_(r)
        gs = [g.flip(0) * 0.5 for g in gs]


# ------------------------------------------------------------- the kernel

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
def test_matches_torch_backend(device, dtype, d_step):
    # block=32: most tensors have full, aligned blocks (fast path) and a tail (masked path)
    _compare(device, dtype, SIZES, d_step, block=32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_block_and_operator(device, dtype):
    """The production configuration, through torch.ops.esgdm.triton_step_."""
    _compare(device, dtype, [3, 2500, 1, 4096 + 33], d_step=True, steps=1, via_op=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hints", [True, False], ids=["hints", "nohints"])
def test_unaligned_views(device, hints):
    """Tensors that start 4 or 8 bytes past a 16-byte boundary take the masked path."""
    sizes = [70, 33, 64, 5]
    total = sum(sizes) + 16 * len(sizes)
    g = torch.Generator().manual_seed(3)

    def views(scale=1.0, offset_step=1):
        flat = (torch.randn(total, generator=g) * scale).to(device)
        out, at = [], 1
        for k, n in enumerate(sizes):
            off = at + (k % 2) * offset_step  # 1, 2+..., never a multiple of 4 elements
            out.append(flat[off:off + n])
            at = off + n + 3
        return out

    ps, gs, hs = views(), views(offset_step=2), views(3.0)
    ms, ds = views(), [v.square() for v in views()]
    assert any(t.data_ptr() % 16 for t in ps + gs + ms)
    scalars = _scalars(len(sizes), seed=5)
    p_ref, m_ref, d_ref = [p.clone() for p in ps], [m.clone() for m in ms], [d.clone() for d in ds]
    torch_step(p_ref, gs, m_ref, d_ref, hs, scalars)
    p0, m0, d0 = [p.clone() for p in ps], [m.clone() for m in ms], [d.clone() for d in ds]
    K.fused_step(ps, gs, ms, ds, hs, scalars, block=32, hints=hints)
    _check_step(p0, gs, m0, d0, ps, ms, ds, p_ref, m_ref, d_ref, torch.float32)


def test_block_table_64bit():
    """Programs of a tensor with more than 2**31 elements get block indices whose
    element offset (block index * BLOCK) only fits in 64 bits."""
    numels = [0, 1, 2048, 2049, 2**31 + 5, 3]
    table = K.block_table_host(numels, 2048)
    counts = [0, 1, 1, 2, 2**20 + 1, 1]
    assert table.shape == (sum(counts), 2)
    tensor, chunk = table[:, 0], table[:, 1]
    assert tensor.tolist()[:5] == [1, 2, 3, 3, 4] and tensor[-1] == 5
    big = chunk[tensor == 4]
    assert big[0] == 0 and big[-1] == 2**20 and (big[1:] - big[:-1] == 1).all()
    assert int(big[-1]) * 2048 >= 2**31  # the last program's offset overflows int32


@pytest.mark.skipif(not K.INTERPRET, reason="needs the Triton interpreter")
def test_64bit_offsets_interpreted():
    """The last blocks of a tensor of 2**31 + 2 blocks + 7 elements, without 8 GiB.

    The table's base addresses are moved back by the blocks' start offset, so only
    a kernel that adds the 64-bit offset finds the real buffers (a 32-bit offset
    would wrap and read elsewhere)."""
    block = 2048
    numel = 2**31 + 2 * block + 7
    last = -(-numel // block) - 1
    first = last - 1
    start = first * block
    assert start > 2**31
    n_real = numel - start  # one full block and a tail of 7
    ps, gs, ms, ds, hs = _make([n_real], torch.float32, "cpu", d_step=True, seed=7)
    scalars = _scalars(1, seed=2)
    p_ref, m_ref, d_ref = [ps[0].clone()], [ms[0].clone()], [ds[0].clone()]
    torch_step(p_ref, gs, m_ref, d_ref, hs, scalars)
    p0, m0, d0 = [ps[0].clone()], [ms[0].clone()], [ds[0].clone()]

    host = torch.empty((1, K.ROW), dtype=torch.int64)
    K.fill_table(host.numpy(), ps, gs, ms, ds, hs, scalars.numpy())
    shift = start * 4
    for col in (K.P_COL, K.G_COL, K.H_COL, K.M_COL, K.D_COL):
        host[0, col] -= shift
    host[0, K.NUMEL_COL] = numel
    blocks = torch.tensor([[0, first], [0, last]], dtype=torch.int32)
    K.launch_tables(blocks, host, ps[0], d_step=True, block=block)
    _check_step(p0, gs, m0, d0, ps, ms, ds, p_ref, m_ref, d_ref, torch.float32)


def test_empty_lists_and_empty_tensors():
    ps, gs, ms, ds, _ = _make([0, 0], torch.float32, "cpu", d_step=False)
    K.fused_step([], [], [], [], None, torch.zeros(0, 5, dtype=torch.float64))
    K.fused_step(ps, gs, ms, ds, None, _scalars(2))  # no program: nothing to launch


# ------------------------------------------------------------ the operator

def test_schema_text():
    schema = torch.ops.esgdm.triton_step_.default._schema
    assert str(schema) == "esgdm::triton_step_" + ops.STEP_SCHEMA
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["params", "exp_avgs", "exp_avg_ds"]


def test_schema_matches_cpp_op():
    """The C++ extension's esgdm::fused_step_ takes the same argument list."""
    from esgdm.backends import cpp_impl

    if cpp_impl._C is None or not hasattr(torch.ops.esgdm, "fused_step_"):
        pytest.skip(f"C++ extension not loaded: {cpp_impl.LOAD_ERROR}")
    schema = str(torch.ops.esgdm.fused_step_.default._schema)
    assert schema == "esgdm::fused_step_" + ops.STEP_SCHEMA


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_step", [False, True], ids=["plain", "dstep"])
def test_opcheck(device, d_step):
    ps, gs, ms, ds, hs = _make([5, 40, 1], torch.float32, device, d_step)
    args = (ps, gs, ms, ds, hs, _scalars(3))
    torch.library.opcheck(torch.ops.esgdm.triton_step_.default, args)


def test_operator_rejects_bad_input():
    ps, gs, ms, ds, hs = _make([5, 6], torch.float32, "cpu", d_step=True)
    sc = _scalars(2)
    op = torch.ops.esgdm.triton_step_
    with pytest.raises(ValueError, match=r"grads has 1 tensors, params has 2"):
        op(ps, gs[:1], ms, ds, hs, sc)
    with pytest.raises(ValueError, match=r"grads\[1\] has dtype torch.float16"):
        op(ps, [gs[0], gs[1].half()], ms, ds, hs, sc)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has shape \(4,\)"):
        op(ps, gs, [ms[0][:4], ms[1]], ds, hs, sc)
    with pytest.raises(ValueError, match=r"scalars must be a float64 CPU tensor of shape \(2, 5\)"):
        op(ps, gs, ms, ds, hs, sc.float())
    with pytest.raises(ValueError, match=r"float64 are not supported"):
        op([p.double() for p in ps], gs, ms, ds, hs, sc)
    s = [torch.zeros(10)[::2] for _ in range(4)]
    with pytest.raises(ValueError, match=r"params\[0\] .* is not dense"):
        op(s[:1], s[1:2], s[2:3], s[3:], None, _scalars(1))


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(K, "INTERPRET", False)
    ps, gs, ms, ds, _ = _make([5], torch.float32, "cpu", d_step=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.esgdm.triton_step_(ps, gs, ms, ds, None, _scalars(1))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.fused_step(ps, gs, ms, ds, None, _scalars(1))
    reason = backends.get("triton").why_not(torch.device("cpu"), torch.float32)
    assert "TRITON_INTERPRET=1" in reason
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backends.resolve("triton", torch.device("cpu"), torch.float32)


# ------------------------------------------------------------- dispatch

def test_why_not_reasons(monkeypatch):
    b = backends.get("triton")
    assert b.name == "triton"
    assert "not torch.float64" in b.why_not(torch.device("cpu"), torch.float64)
    assert "not mps" in b.why_not(torch.device("mps"), torch.float32)
    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now fails
    reason = b.why_not(torch.device("cuda"), torch.float32)
    assert reason.startswith("Triton is not importable (") and "import of triton halted" in reason


@pytest.mark.skipif(not K.INTERPRET, reason="needs the Triton interpreter")
def test_resolve_on_cpu():
    backend, note = backends.resolve("triton", torch.device("cpu"), torch.bfloat16)
    assert backend.name == "triton" and note is None
    auto, _ = backends.resolve("auto", torch.device("cpu"), torch.float32)
    assert auto.name != "triton"  # auto never picks the interpreter


@pytest.mark.gpu
@requires_cuda
def test_auto_picks_triton_on_cuda():
    backend, note = backends.resolve("auto", torch.device("cuda"), torch.float32)
    assert backend.name == "triton" and note is None


# ------------------------------------------------- through the optimizer

def _model(device, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3),
                                torch.nn.Linear(3, 2, bias=False))
    return model.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_with_missing_grad(device):
    """A training run where one parameter has no gradient on most steps, and one
    parameter never has one: Triton and torch backends follow the same trajectory."""
    models = [_model(device, torch.float32) for _ in range(2)]
    opts = [esgdm.ESGDM(m.parameters(), lr=0.3, weight_decay=0.01, d_warmup=3, update_d_every=4,
                        backend=name, generator=torch.Generator(device).manual_seed(1))
            for m, name in zip(models, ("triton", "torch"))]
    x = torch.randn(16, 6, device=device)
    y = torch.randn(16, 2, device=device)
    frozen = [list(m.parameters())[-1].detach().clone() for m in models]
    for step in range(9):
        for m, o in zip(models, opts):
            o.zero_grad(set_to_none=True)
            loss = (m(x) - y).square().mean()
            loss.backward(create_graph=o.should_create_graph())
            params = list(m.parameters())
            params[-1].grad = None  # never has a gradient
            if step % 3:
                params[1].grad = None  # the first bias misses most steps
            o.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opts[0].backend_for(opts[0].buckets()[0]).name == "triton"
    for m, f, o in zip(models, frozen, opts):
        last = list(m.parameters())[-1]
        assert torch.equal(last, f) and last not in o.state


# ------------------------------------------------------------ torch.compile

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_step(device, compiler):
    """torch.compile of a function calling opt.step(), over plain steps and D-steps:
    the Triton operator is in a traced graph, and the compiled run gives the eager
    result exactly (parameters and step counters).

    Graph breaks (torch 2.14): on D-steps at Bucket.view's storage_offset() (the sign
    vectors) and at torch.autograd.grad (the HVP); on every step at the counter update,
    which is compiler-disabled because Dynamo drops attribute writes on optimizers."""
    if compiler == "inductor":
        pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    models = [_model(device, torch.float32) for _ in range(2)]
    opts = [esgdm.ESGDM(m.parameters(), lr=0.3, d_warmup=2, update_d_every=3, backend="triton",
                        generator=torch.Generator(device).manual_seed(1)) for m in models]
    x = torch.randn(8, 6, device=device)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        if compiler == "aot_eager":
            return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    @torch.compile(backend=recording)
    def compiled_step(o):
        o.step()

    d_steps = []
    for _ in range(6):
        for m, o, step in zip(models, opts, (lambda o: o.step(), compiled_step)):
            o.zero_grad(set_to_none=True)
            m(x).square().mean().backward(create_graph=o.should_create_graph())
            step(o)
        d_steps.append(opts[0].steps_since_d == 1)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
        assert (opts[0].steps, opts[0].steps_since_d) == (opts[1].steps, opts[1].steps_since_d)
    assert d_steps == [True, True, False, False, True, False]
    assert any("esgdm.triton_step_" in code for code in graphs)
    torch._dynamo.reset()


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@requires_cuda
def test_bucket_over_2_31_elements_cuda():
    """A bucket of more than 2**31 fp32 elements (about 43 GB with the HVP), checked
    on the blocks around the 2**31 boundary and at both ends."""
    free, _ = torch.cuda.mem_get_info()
    big = 2**31 + 3 * 2048 + 11
    if free < 5 * 4 * big + 2 * 2**30:
        pytest.skip(f"needs ~{5 * 4 * big / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    sizes = [1000, big]
    dev = "cuda"
    ps = [torch.empty(n, device=dev).normal_() for n in sizes]
    gs = [torch.empty(n, device=dev).normal_() for n in sizes]
    hs = [torch.empty(n, device=dev).normal_() for n in sizes]
    ms = [torch.empty(n, device=dev).normal_() for n in sizes]
    ds = [torch.empty(n, device=dev).uniform_() for n in sizes]
    scalars = _scalars(2, seed=11)
    windows = [(0, 4096), (2**31 - 4096, 2**31 + 4096), (big - 5000, big)]
    before = [[t[1][a:b].clone() for t in (ps, gs, hs, ms, ds)] for a, b in windows]
    small = [t[0].clone() for t in (ps, gs, hs, ms, ds)]
    K.fused_step(ps, gs, ms, ds, hs, scalars)
    torch.cuda.synchronize()
    cases = [(small, [t[0] for t in (ps, ms, ds)], scalars[:1])]
    cases += [(b, [t[1][a:e] for t in (ps, ms, ds)], scalars[1:]) for b, (a, e) in zip(before, windows)]
    for (p, g, h, m, d), (p_out, m_out, d_out), sc in cases:
        p0, m0, d0 = p.clone(), m.clone(), d.clone()
        torch_step([p], [g], [m], [d], [h], sc)
        _check_step([p0], [g], [m0], [d0], [p_out], [m_out], [d_out], [p], [m], [d], torch.float32)
    del ps, gs, hs, ms, ds
    torch.cuda.empty_cache()


@pytest.mark.gpu
@requires_cuda
def test_bucket_state_is_16_byte_aligned_cuda():
    """The optimizer's own buffers give the fast path: every slice is 16-byte aligned."""
    params = [torch.zeros(n, device="cuda") for n in (3, 5, 1, 77)]
    b = Bucket(params, [0] * 4)
    for i in range(4):
        assert b.exp_avg_views[i].data_ptr() % 16 == 0
        assert b.exp_avg_d_views[i].data_ptr() % 16 == 0
