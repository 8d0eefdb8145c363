"""The Triton kernel that adds the finite-difference probe's signs as it draws them
(``esgdm.kernels.esgdm_signs``), against the signs drawn as tensors by
:func:`esgdm.signs.rademacher` and added the way CUDA's ``torch._foreach_add_(alpha=)``
adds them: in float32 (float64 for float64) with alpha in that type, rounded once to the
tensor's dtype.  Bit for bit, inf, NaN and -0.0 included.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1), which converts float32 to bfloat16 by truncation: bfloat16 is
compared on a GPU only.  The GPU twins (marked ``gpu``) also compare with torch's own
``_foreach_add_`` on CUDA and check the optimizer takes the kernel on CUDA parameters.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import requires_cuda  # noqa: E402

import esgdm  # noqa: E402
import esgdm.curvature as curvature_module  # noqa: E402
from esgdm.kernels import esgdm_signs as S  # noqa: E402
from esgdm.signs import rademacher, stream_key  # noqa: E402

CPU = pytest.param("cpu", marks=pytest.mark.skipif(
    not S.INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before the kernels are imported"))
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])

# Around the kernel's block (1024 elements): empty, one, odd, a block, blocks and tails.
SHAPES = [(0,), (1,), (3, 5), (1024,), (1025,), (2, 1500)]


def _inputs(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = [(torch.randn(s, generator=g, dtype=torch.float64) * 10).to(dtype).to(device) for s in SHAPES]
    ts[4][:4] = torch.tensor([float("inf"), float("nan"), -0.0, 6e4], dtype=torch.float64).to(dtype)
    # A contiguous view one element into its buffer: unaligned, the masked path throughout.
    ts.append((torch.randn(2049, generator=g, dtype=torch.float64) * 10).to(dtype).to(device)[1:])
    return ts


def _expected(ts, keys, starts, alpha):
    """CUDA's add(alpha=) of the drawn signs: the math type, alpha in it, one rounding."""
    out = []
    for t, key, start in zip(ts, keys, starts):
        math = S.MATH_DTYPES[t.dtype]
        v = rademacher_from_key(key, t, start).to(math)
        out.append((t.to(math) + torch.tensor(alpha, dtype=math) * v).to(t.dtype))
    return out


def rademacher_from_key(key, t, start):
    """esgdm.signs' signs under a 32-bit key (stream_key's value) for t's elements."""
    x = torch.arange(start, start + t.numel(), dtype=torch.int64) & 0xFFFFFFFF
    x = x ^ key
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * mult) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return torch.where(x >= 2**31, -1.0, 1.0).to(torch.float64).view(t.shape).to(t.device)


def _same(a, b):
    return a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()) \
        and torch.equal(torch.signbit(a), torch.signbit(b))


def test_reference_signs_are_esgdm_signs():
    """The test's own reading of the key gives rademacher's signs (so _expected is the
    probe's perturbation)."""
    t = torch.empty(3000)
    for start in (0, 64, 2**32 - 7):
        assert torch.equal(rademacher_from_key(stream_key(5, 17, 3), t, start).float(),
                           rademacher(5, 17, 3, t.shape, dtype=torch.float32, device="cpu", start=start))


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.2345e-3, -0.3, 3.0])
def test_kernel_adds_the_drawn_signs(device, dtype, alpha):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter converts float32 to bfloat16 by truncation")
    ts = _inputs(dtype, device)
    keys = [stream_key(5, 17, k) for k in range(len(ts))]
    starts = [0, 64, 2**32 - 3, 0, 2**31, 7, 5]  # (the index wraps at 2**32, as rademacher's)
    want = _expected(ts, keys, starts, alpha)
    got, backups = [t.clone() for t in ts], [torch.full_like(t, 7) for t in ts]
    S.add_signs_(got, keys, starts, alpha, backups)
    for i, (a, b, before, saved) in enumerate(zip(got, want, ts, backups)):
        assert _same(a, b), f"tensors[{i}]"
        assert _same(saved, before), f"backups[{i}]"
    again = [t.clone() for t in ts]
    S.add_signs_(again, keys, starts, alpha)  # without backups: the same sums
    assert all(_same(a, b) for a, b in zip(again, want))


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_mixed_dtypes_one_call(device):
    """A call with several dtypes (one launch each) perturbs every tensor with its key."""
    ts = _inputs(torch.float32, device) + _inputs(torch.float64, device, seed=1)
    keys = [stream_key(9, 2, k) for k in range(len(ts))]
    want = _expected(ts, keys, [0] * len(ts), 0.25)
    S.add_signs_(ts, keys, [0] * len(ts), 0.25)
    assert all(_same(a, b) for a, b in zip(ts, want))


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("bad,match", [
    ("keys", "2 tensors, 1 keys"),
    ("strided", r"tensors\[1\] must be a contiguous"),
    ("int", r"tensors\[0\] must be a contiguous float32"),
    ("backup", r"backups\[1\] must be a contiguous tensor like"),
])
def test_bad_input_is_refused_before_any_write(device, bad, match):
    ts = [torch.randn(10, device=device), torch.randn(4, 6, device=device)]
    backups = [torch.empty_like(t) for t in ts]
    keys = [1, 2]
    if bad == "keys":
        keys = [1]
    elif bad == "strided":
        ts[1] = ts[1].t()
    elif bad == "int":
        ts[0] = torch.arange(10, device=device)
    else:
        backups[1] = torch.empty(5, device=device)
    before = [t.clone() for t in ts]
    with pytest.raises(ValueError, match=match):
        S.add_signs_(ts, keys, [0, 0], 0.5, backups)
    assert all(torch.equal(a, b) for a, b in zip(ts, before))


def test_the_fused_add_is_picked_by_device(monkeypatch):
    """SignVectors' op: C++ for CPU tensors, the Triton kernel for tensors on one CUDA
    device, none (signs drawn as tensors) for mixed or other devices or when turned off."""
    from esgdm.backends import cpp_impl

    cpu_op = None if cpp_impl._C is None else getattr(cpp_impl._C, "add_signs_", None)
    assert curvature_module._add_signs_op([torch.zeros(3)]) is cpu_op
    assert curvature_module._add_signs_op([torch.zeros(3, device="meta")]) is None
    assert curvature_module._add_signs_op([torch.zeros(3), torch.zeros(3, device="meta")]) is None
    if torch.cuda.is_available() and not S.INTERPRET:
        assert curvature_module._add_signs_op([torch.zeros(3, device="cuda")]) is S.add_signs_
        assert curvature_module._add_signs_op([torch.zeros(3), torch.zeros(3, device="cuda")]) is None
    monkeypatch.setattr(curvature_module, "USE_ADD_SIGNS", False)
    assert curvature_module._add_signs_op([torch.zeros(3)]) is None


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kernel_is_foreach_add_of_the_drawn_signs_on_cuda(dtype):
    """On a GPU: the kernel's sums are those of torch._foreach_add_ of rademacher's
    signs, which is what the optimizer did before the kernel."""
    ts = _inputs(dtype, "cuda")
    keys = [stream_key(5, 17, k) for k in range(len(ts))]
    want = [t.clone() for t in ts]
    torch._foreach_add_(want, [rademacher(5, 17, k, t.shape, dtype=dtype, device="cuda")
                               for k, t in enumerate(ts)], alpha=-0.3)
    S.add_signs_(ts, keys, [0] * len(ts), -0.3)
    assert all(_same(a, b) for a, b in zip(ts, want))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_fused_signs_give_the_drawn_signs_trajectory_on_cuda(monkeypatch, scheme):
    """Training on a GPU with finite differences: the kernel's signs and the drawn signs
    give the same parameters and state, bit for bit."""
    import torch.nn.functional as F

    calls = []
    real = S.add_signs_
    monkeypatch.setattr(S, "add_signs_", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(curvature_module, "USE_ADD_SIGNS", fused)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).cuda()
        x, y = torch.randn(8, 12, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
        opt = esgdm.ESGDM(model.parameters(), lr=0.1, hvp="finite_difference", fd_scheme=scheme,
                          update_d_every=2, seed=4)

        def closure(opt=opt, model=model, x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        for _ in range(5):
            opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()]
                       + [t.clone() for p in model.parameters() for t in opt.state[p].values()
                          if isinstance(t, torch.Tensor)])
        assert bool(calls) == fused
        calls.clear()
    for a, b in zip(*results):
        assert torch.equal(a, b)


_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from esgdm.kernels import esgdm_signs as S

out = {}
for dtype in ("fp32", "fp64", "bf16", "fp16"):
    for backup in (False, True):
        constexprs = dict(ROW_=S.ROW, BLOCK_=S.BLOCK, BACKUP=backup)
        pointers = {"blocks_ptr": "*i32", "table_ptr": "*i64", "alpha_ptr": "*fp64" if dtype == "fp64" else "*fp32",
                    "t_ref": f"*{dtype}"}
        try:  # Triton >= 3.2
            src = ASTSource(S.add_signs_kernel, dict(pointers, **{n: "constexpr" for n in constexprs}),
                            constexprs=constexprs)
        except Exception:  # Triton 3.0/3.1: by position
            names = S.add_signs_kernel.arg_names
            src = ASTSource(S.add_signs_kernel, {names.index(n): t for n, t in pointers.items()},
                            constants={names.index(n): v for n, v in constexprs.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": S.NUM_WARPS})
        out[f"{dtype}-{backup}"] = k.asm["ptx"]
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """Compiled ahead of time for sm_90 (no GPU needed): every dtype, with and without
    backups; the sign's hash is 32-bit integer products; aligned full blocks load and
    store 128 bits at a time."""
    import json
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path / "ptx.json")], capture_output=True,
                         text=True, env=env, cwd=root, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    ptx = json.load(open(tmp_path / "ptx.json"))
    assert len(ptx) == 8
    for name, text in ptx.items():
        assert "mul.lo.s32" in text or "mul.lo.u32" in text, name  # the hash's wrapping products
        assert ("st.global" in text) and ("ld.global" in text), name
        # the aligned full blocks' accesses are 128-bit
        assert re.search(r"ld\.global(\.\w+)*\.v[24]\.b(32|64)", text), name
        assert re.search(r"st\.global(\.\w+)*\.v[24]\.b(32|64)", text), name
