"""ESGDM against the conventions every torch.optim optimizer is expected to keep.

Each test names the convention it checks.  Where torch's own optimizers are the
reference (param names, pass-through state), the test runs ``torch.optim.Adam`` beside
ESGDM and asks for the same behaviour; where the convention is about the numbers
(complex parameters, ``maximize``), the reference is an independent computation on
real tensors.  What cannot hold for a second-order method is listed in the README
(*torch.optim conventions*), not here.
"""

import copy
import io
import re
from pathlib import Path

import pytest
import torch

import esgdm
from esgdm import backends
from esgdm.backends import cpp_impl
from esgdm.hvp import RngSnapshot, autograd_hvp, finite_difference_hvp
from esgdm.optimizer import draw_signs

README = Path(__file__).resolve().parent.parent / "README.md"


def _available(name):
    return backends.get(name).why_not(torch.device("cpu"), torch.float32) is None


BACKENDS = ["torch"] + (["cpu"] if _available("cpu") else [])


def run(opt, param, loss_fn, steps, hvp):
    """``steps`` steps of ``opt`` on ``loss_fn()``, with a closure for finite differences."""
    for _ in range(steps):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward(create_graph=opt.should_create_graph())
            return loss
        if hvp == "autograd":
            closure()
            opt.step()
        else:
            opt.step(closure)


# ------------------------------------------------------------------ foreach / fused

class TestImplementationSwitches:
    """torch.optim's ``foreach`` and ``fused`` keywords are None or a bool.  ``False``
    asks for the plain per-tensor implementation (ESGDM's ``"torch"`` backend),
    ``fused=True`` for a fused kernel; only combinations that cannot hold raise, and a
    value that is not a bool is a TypeError."""

    def params(self):
        return [torch.nn.Parameter(torch.randn(4))]

    @pytest.mark.parametrize("kwargs", [dict(foreach=False), dict(fused=False),
                                        dict(foreach=False, fused=False), dict(fused=False, backend="auto")])
    def test_false_selects_the_per_tensor_backend(self, kwargs):
        opt = esgdm.ESGDM(self.params(), **kwargs)
        assert opt.backend == "torch"

    def test_false_steps_like_the_torch_backend(self):
        """fused=False is the ``"torch"`` backend, number for number."""
        torch.manual_seed(3)
        a = torch.nn.Parameter(torch.randn(5))
        b = torch.nn.Parameter(a.detach().clone())
        oa = esgdm.ESGDM([a], lr=0.3, seed=1, fused=False)
        ob = esgdm.ESGDM([b], lr=0.3, seed=1, backend="torch")
        run(oa, a, lambda: (a ** 4).sum(), 3, "autograd")
        run(ob, b, lambda: (b ** 4).sum(), 3, "autograd")
        assert torch.equal(a, b)

    @pytest.mark.parametrize("kwargs", [dict(), dict(foreach=True), dict(fused=True),
                                        dict(fused=True, foreach=False), dict(foreach=None, fused=None)])
    def test_true_and_none_keep_the_fused_backends(self, kwargs):
        assert esgdm.ESGDM(self.params(), backend="auto", **kwargs).backend == "auto"

    def test_fused_true_overrides_a_torch_default_from_the_environment(self, monkeypatch):
        monkeypatch.setenv("ESGDM_BACKEND", "torch")
        assert esgdm.ESGDM(self.params(), fused=True).backend == "auto"
        assert esgdm.ESGDM(self.params()).backend == "torch"

    @pytest.mark.parametrize("kwargs,match", [
        (dict(fused=True, foreach=True), "fused=True and foreach=True cannot both hold"),
        (dict(fused=True, backend="torch"), "fused=True asks for a fused multi-tensor kernel"),
        (dict(foreach=True, backend="torch"), "foreach=True asks for a fused multi-tensor kernel"),
        (dict(fused=False, backend="cpu"), "fused=False asks for the unfused per-tensor step"),
        (dict(foreach=False, backend="triton"), "foreach=False asks for the unfused per-tensor step"),
    ])
    def test_contradictions_raise(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            esgdm.ESGDM(self.params(), **kwargs)

    @pytest.mark.parametrize("kwargs", [dict(foreach=1), dict(fused="yes"), dict(foreach=0), dict(fused=[])])
    def test_non_bool_values_are_type_errors(self, kwargs):
        with pytest.raises(TypeError, match="must be None, True or False"):
            esgdm.ESGDM(self.params(), **kwargs)

    def test_fused_true_refuses_an_unfused_fallback_and_changes_nothing(self, monkeypatch):
        """With fused=True, "auto" falling back to the per-tensor backend is an error."""
        class Broken(backends.Backend):
            name = "cpu"

            def why_not(self, device, dtype):
                return "it is broken on purpose"

        monkeypatch.setitem(backends._loaded, "cpu", Broken())
        p = torch.nn.Parameter(torch.randn(3))
        opt = esgdm.ESGDM([p], fused=True)
        p.grad = torch.ones_like(p)
        opt.steps = opt.d_warmup  # a plain step
        before = p.detach().clone()
        with pytest.raises(backends.BackendUnavailableError, match="fused=True, but no fused esgdm kernel"):
            opt.step()
        assert torch.equal(p.detach(), before) and opt.steps == opt.d_warmup and not opt.state


# ------------------------------------------------------------------ complex parameters

def _real_loss(x, A):
    """A non-quadratic loss of a real tensor of shape (..., 2), coupling its entries."""
    y = x.reshape(-1)
    return (A @ y).square().sum() + 0.25 * y.pow(4).sum() + y.sum()


class TestComplexParameters:
    """Complex parameters are optimized as their real view, ``torch.view_as_real(p)``:
    the gradient, the sign vector, the Hessian-vector product and the update are those
    of that real tensor, as torch's built-in optimizers do.  The keyed sign vectors
    are drawn per parameter from its shape, so a complex parameter draws the signs of
    its real view (shape ``p.shape + (2,)``): then it follows a real parameter holding
    its real view bit for bit.  Its state is shown, as torch.optim's is, as complex
    tensors (views of the real state), and ``state_dict`` round-trips them."""

    @pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_follows_its_real_view_step_for_step(self, hvp, backend):
        torch.manual_seed(0)
        A = torch.randn(24, 24) / 5
        x0 = torch.randn(3, 4, 2)
        z = torch.nn.Parameter(torch.view_as_complex(x0.clone()))
        r = torch.nn.Parameter(x0.clone())
        oz = esgdm.ESGDM([z], lr=0.3, seed=7, hvp=hvp, backend=backend, d_warmup=3, update_d_every=2)
        orr = esgdm.ESGDM([r], lr=0.3, seed=7, hvp=hvp, backend=backend, d_warmup=3, update_d_every=2)
        for k in range(8):  # D-steps and plain steps
            run(oz, z, lambda: _real_loss(torch.view_as_real(z), A), 1, hvp)
            run(orr, r, lambda: _real_loss(r, A), 1, hvp)
            assert torch.equal(torch.view_as_real(z.detach()), r.detach()), f"step {k}"
        sz, sr = oz.state[z], orr.state[r]
        for key in ("exp_avg", "exp_avg_d"):
            assert sz[key].dtype == torch.complex64 and sz[key].shape == z.shape
            assert torch.equal(torch.view_as_real(sz[key]), sr[key])
        for key in ("exp_avg_bias_corr", "lr_warmup_cumprod", "step"):
            assert torch.equal(sz[key], sr[key])

    def test_layouts_step_like_a_contiguous_copy(self):
        """A transposed or strided complex parameter steps as a contiguous one holding
        the same values (its state keeps the parameter's layout or a dense copy).

        Equal to float32 rounding, not bit for bit: the tensor's curvature scale (the
        mean of sqrt(D), which sets the floor of the default rule) is a reduction whose
        rounding follows the order of the state in memory."""
        torch.manual_seed(4)
        base = torch.randn(6, 8, dtype=torch.complex64)
        odd = [torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(base.clone())]
        odd[1].data = odd[1].data[::2, 1::3]  # a strided slice of a bigger tensor
        plain = [torch.nn.Parameter(t.detach().contiguous()) for t in odd]
        for params in (odd, plain):
            opt = esgdm.ESGDM(params, lr=0.3, seed=5, backend="torch", d_warmup=2, update_d_every=2)
            run(opt, None, lambda: sum(torch.view_as_real(p).pow(4).sum() for p in params), 4, "autograd")  # noqa: B023 (called in this iteration)
        for a, b in zip(odd, plain):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)

    def test_signs_are_those_of_the_real_view(self):
        z = torch.zeros(3, 5, dtype=torch.complex64)
        assert torch.equal(draw_signs(11, 4, 2, z), draw_signs(11, 4, 2, torch.zeros(3, 5, 2)))

    @pytest.mark.parametrize("scheme", ["autograd", "forward", "central"])
    def test_hvp_of_complex_arithmetic_is_the_real_view_hessian(self, scheme):
        """A loss written with complex ops: the HVP equals the Hessian of the same
        function written in real arithmetic on the real view (float64; autograd to
        1e-12, finite differences to their truncation error)."""
        g = torch.Generator().manual_seed(5)
        B = torch.randn(4, 4, dtype=torch.complex128, generator=g)
        Br, Bi = B.real, B.imag

        def complex_loss(z):
            return (B @ z).abs().square().sum() + z.abs().pow(4).sum() + (z * z).real.sum()

        def real_loss(x):  # the same function of (x, y) = view_as_real(z), real ops only
            re, im = x[..., 0], x[..., 1]
            bre, bim = Br @ re - Bi @ im, Bi @ re + Br @ im
            return (bre ** 2 + bim ** 2).sum() + ((re ** 2 + im ** 2) ** 2).sum() + (re ** 2 - im ** 2).sum()

        x0 = torch.randn(4, 2, dtype=torch.float64, generator=g)
        v = draw_signs(3, 0, 0, torch.zeros(4, dtype=torch.complex128))
        assert v.shape == (4, 2)
        _, want = torch.autograd.functional.hvp(real_loss, x0, v)

        z = torch.view_as_complex(x0.clone()).requires_grad_()
        if scheme == "autograd":
            (grad,) = torch.autograd.grad(complex_loss(z), z, create_graph=True)
            (h,) = autograd_hvp([z], [grad], [v])
            tol = 1e-12
        else:
            def closure():
                z.grad = None
                complex_loss(z).backward()
            closure()
            grad = z.grad
            before = z.detach().clone()
            (h,) = finite_difference_hvp([z], [grad], [v], closure, RngSnapshot(), scheme=scheme)
            assert torch.equal(z.detach(), before) and z.grad is grad  # θ and its gradient put back
            tol = 1e-6 if scheme == "forward" else 1e-9
        assert h.shape == (4, 2) and h.dtype == torch.float64
        assert (h - want).norm() <= tol * want.norm(), ((h - want).norm() / want.norm()).item()

    @pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
    def test_native_complex_loss_matches_the_real_arithmetic_run(self, hvp):
        """ESGDM on a loss written with complex ops, against the same loss written in
        real arithmetic on a real parameter: equal up to rounding (float64, 1e-9)."""
        g = torch.Generator().manual_seed(6)
        B = torch.randn(6, 6, dtype=torch.complex128, generator=g)
        Br, Bi = B.real, B.imag
        x0 = torch.randn(6, 2, dtype=torch.float64, generator=g)
        z = torch.nn.Parameter(torch.view_as_complex(x0.clone()))
        r = torch.nn.Parameter(x0.clone())

        def complex_loss():
            return (B @ z).abs().square().sum() + z.abs().pow(4).sum()

        def real_loss():
            re, im = r[..., 0], r[..., 1]
            return ((Br @ re - Bi @ im) ** 2 + (Bi @ re + Br @ im) ** 2).sum() + ((re ** 2 + im ** 2) ** 2).sum()

        oz = esgdm.ESGDM([z], lr=0.2, seed=2, hvp=hvp, backend="torch", d_warmup=4, update_d_every=3)
        orr = esgdm.ESGDM([r], lr=0.2, seed=2, hvp=hvp, backend="torch", d_warmup=4, update_d_every=3)
        run(oz, z, complex_loss, 10, hvp)
        run(orr, r, real_loss, 10, hvp)
        diff = (torch.view_as_real(z.detach()) - r.detach()).norm() / r.detach().norm()
        assert diff < 1e-9, diff.item()
        assert not torch.equal(r.detach(), x0)  # it moved

    def test_state_dict_round_trips_complex_state(self):
        torch.manual_seed(1)
        A = torch.randn(8, 8) / 3
        z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
        opt = esgdm.ESGDM([z], lr=0.3, seed=4, backend="torch")
        run(opt, z, lambda: _real_loss(torch.view_as_real(z), A), 3, "autograd")
        saved = copy.deepcopy(opt.state_dict())
        assert saved["state"][0]["exp_avg"].dtype == torch.complex64
        z2 = torch.nn.Parameter(z.detach().clone())
        opt2 = esgdm.ESGDM([z2], lr=0.3, backend="torch")
        opt2.load_state_dict(saved)
        for key, value in opt.state[z].items():
            assert torch.equal(opt2.state[z2][key], value), key
        copied = copy.deepcopy((z, opt))  # a copy rebuilds its buffers from the complex state
        run(opt, z, lambda: _real_loss(torch.view_as_real(z), A), 3, "autograd")
        run(opt2, z2, lambda: _real_loss(torch.view_as_real(z2), A), 3, "autograd")
        z3, opt3 = copied
        run(opt3, z3, lambda: _real_loss(torch.view_as_real(z3), A), 3, "autograd")
        assert torch.equal(z, z2) and torch.equal(z, z3)

    @pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
        cpp_impl._C is None, reason="the cpu backend (esgdm._C) is not built"))])
    @pytest.mark.parametrize("dtypes", [(torch.complex64, torch.float32), (torch.complex128, torch.float64)])
    def test_torch_save_takes_complex_and_real_state_together(self, backend, dtypes):
        """A model with complex and real parameters of one precision (a spectral layer
        beside a Linear): ``torch.save`` of the state dict, alone or beside the model's,
        then ``torch.load(weights_only=True)`` into a new optimizer that steps on as the
        first does.  (torch.save refuses a storage seen as two dtypes, so a complex
        parameter's state must not share memory with real parameters' state.)"""
        ctype, rtype = dtypes
        torch.manual_seed(2)

        def make():
            g = torch.Generator().manual_seed(3)
            return [torch.nn.Parameter(torch.randn(5, dtype=ctype, generator=g)),
                    torch.nn.Parameter(torch.randn(3, 4, dtype=rtype, generator=g))]

        def loss(ps):
            return ps[0].abs().pow(4).sum() + ps[1].pow(4).sum() + (ps[1].sum() * ps[0].real.sum())

        params = make()
        opt = esgdm.ESGDM(params, lr=0.3, seed=4, backend=backend, hvp="finite_difference")
        run(opt, None, lambda: loss(params), 3, "finite_difference")
        buf = io.BytesIO()
        torch.save({"model": {str(i): p for i, p in enumerate(params)}, "opt": opt.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        assert saved["opt"]["state"][0]["exp_avg"].dtype == ctype
        params2 = [torch.nn.Parameter(saved["model"][str(i)].detach().clone()) for i in range(2)]
        opt2 = esgdm.ESGDM(params2, lr=0.3, seed=4, backend=backend, hvp="finite_difference")
        opt2.load_state_dict(saved["opt"])
        run(opt, None, lambda: loss(params), 3, "finite_difference")
        run(opt2, None, lambda: loss(params2), 3, "finite_difference")
        for a, b in zip(params, params2):
            assert torch.equal(a, b)

    def test_assigning_complex_state_is_copied_in(self):
        """``opt.state[p][key] = tensor`` works for a complex parameter as for a real
        one: a plain step with a zero gradient then decays the assigned momentum by
        beta1 (to float32 rounding); a real tensor there is refused, changing nothing."""
        z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
        opt = esgdm.ESGDM([z], backend="torch", d_warmup=1, update_d_every=100)
        run(opt, z, lambda: z.abs().pow(4).sum(), 1, "autograd")
        new = torch.tensor([1 + 2j, 3 - 1j, -1j], dtype=torch.complex64)
        opt.state[z]["exp_avg"] = new
        z.grad = torch.zeros_like(z)
        opt.step()
        assert opt.state[z]["exp_avg"].dtype == torch.complex64
        torch.testing.assert_close(opt.state[z]["exp_avg"], 0.9 * new, rtol=1e-6, atol=0)
        before = (z.detach().clone(), opt.state[z]["exp_avg"].clone(), opt.steps)
        opt.state[z]["exp_avg"] = torch.zeros(3)
        with pytest.raises(ValueError, match="must be complex like its parameter, got torch.float32"):
            opt.step()
        assert torch.equal(z.detach(), before[0]) and opt.steps == before[2]

    def test_bfloat16_state_is_refused_for_complex_parameters(self):
        with pytest.raises(ValueError, match="cannot have state_dtype=torch.bfloat16"):
            esgdm.ESGDM([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], state_dtype=torch.bfloat16)


# ------------------------------------------------------------------ state_dict / load_state_dict

class TestStatePassThrough:
    """``opt.state`` may hold entries whose key is not a parameter (state-dict hooks and
    tools put them there); torch.optim passes them through ``state_dict()`` and
    ``load_state_dict()`` untouched, and so must ESGDM, steps and copies included."""

    def test_state_dict_passes_a_foreign_key_through(self):
        p = torch.nn.Parameter(torch.randn(3))
        opt = esgdm.ESGDM([p], backend="torch")
        run(opt, p, lambda: (p ** 4).sum(), 2, "autograd")
        opt.state["test"] = 1
        sd = opt.state_dict()
        assert sd["state"]["test"] == 1 and set(sd["state"]) == {0, "test"}
        run(opt, p, lambda: (p ** 4).sum(), 2, "autograd")
        assert opt.state["test"] == 1
        other = copy.deepcopy(opt)
        assert other.state["test"] == 1
        q = torch.nn.Parameter(p.detach().clone())
        fresh = esgdm.ESGDM([q], backend="torch")
        fresh.load_state_dict(opt.state_dict())
        assert fresh.state["test"] == 1 and torch.equal(fresh.state[q]["exp_avg"], opt.state[p]["exp_avg"])

    def test_state_dict_hooks_as_torch_uses_them(self):
        """The pattern of torch's own hook tests: a pre-hook adds an entry, a post-hook removes it."""
        p = torch.nn.Parameter(torch.randn(3))
        for opt in (torch.optim.Adam([p]), esgdm.ESGDM([p], backend="torch")):
            opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))

            def post(o, sd):
                del sd["state"]["test"]
                sd["ran_post_hook"] = True
                return sd
            opt.register_state_dict_post_hook(post)
            sd = opt.state_dict()
            assert sd["ran_post_hook"] and "test" not in sd["state"] and opt.state["test"] == 1

    def test_a_state_dict_keyed_by_name_is_refused(self):
        model = torch.nn.Linear(2, 2)
        opt = esgdm.ESGDM(model.named_parameters(), backend="torch")
        sd = opt.state_dict()
        sd["state"] = {"weight": {}}
        with pytest.raises(ValueError, match="keys its state by parameter name"):
            opt.load_state_dict(sd)


class TestParamNames:
    """An optimizer built from ``named_parameters()`` keeps ``param_names`` in its
    groups.  Loading a checkpoint saved without names keeps the receiver's names;
    names in the checkpoint replace them; torch.optim.Adam is the reference."""

    @pytest.mark.parametrize("saver_named,loader_named", [(False, True), (True, False), (True, True)])
    def test_names_after_load_are_adams(self, saver_named, loader_named):
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))

        def params(named):
            return model.named_parameters() if named else model.parameters()

        results = []
        for cls, kw in ((torch.optim.Adam, {}), (esgdm.ESGDM, dict(backend="torch"))):
            saver, loader = cls(params(saver_named), **kw), cls(params(loader_named), **kw)
            loader.load_state_dict(saver.state_dict())
            results.append([g.get("param_names") for g in loader.param_groups])
            sd = loader.state_dict()  # no KeyError afterwards
            assert [g.get("param_names") for g in sd["param_groups"]] == results[-1]
        assert results[0] == results[1]
        assert results[1][0] == [n for n, _ in model.named_parameters()]

    def test_named_optimizer_steps_after_loading_an_unnamed_checkpoint(self):
        model = torch.nn.Linear(3, 1)
        a = esgdm.ESGDM(model.parameters(), backend="torch")
        b = esgdm.ESGDM(model.named_parameters(), backend="torch")
        loss = lambda: model(torch.ones(2, 3)).square().sum()  # noqa: E731
        run(a, None, loss, 2, "autograd")
        b.load_state_dict(a.state_dict())
        run(b, None, loss, 2, "autograd")
        assert b.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


# ------------------------------------------------------------------ meta parameters

class TestMetaParameters:
    """Parameters on the ``meta`` device (deferred initialisation, shape propagation)
    hold no values.  A step on them runs the whole path shape-only: the state appears
    with the right shapes and dtypes, on meta, the counters advance, and nothing asks
    for a value."""

    @pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
    def test_steps_run_shape_only(self, hvp, dtype):
        p = torch.nn.Parameter(torch.empty(3, 2, device="meta", dtype=dtype))
        opt = esgdm.ESGDM([p], hvp=hvp, d_warmup=2, update_d_every=2)
        real_dtype = dtype.to_real()
        run(opt, p, lambda: torch.view_as_real(p).pow(4).sum() if p.is_complex() else p.pow(4).sum(), 4, hvp)
        assert opt.steps == 4
        state = opt.state[p]
        assert state["exp_avg"].is_meta and state["exp_avg"].shape == p.shape
        assert state["exp_avg"].dtype.to_real() == real_dtype
        assert state["exp_avg_d"].is_meta and state["exp_avg_d"].dtype == state["exp_avg"].dtype
        assert state["step"].is_meta and p.is_meta


# ------------------------------------------------------------------ maximize / differentiable

class TestMaximize:
    """``maximize=True`` ascends the objective: the step uses ``-g``.  For ESGD-M the
    curvature estimate does not flip: ``D`` is built from ``h * h``, and the Hessian
    of ``-f`` is ``-H``.  So maximizing ``f`` is exactly minimizing ``-f``.  Like
    torch.optim, ``maximize`` is a per-group hyper-parameter."""

    @pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_maximizing_f_is_minimizing_minus_f(self, hvp, backend):
        torch.manual_seed(2)
        x0 = torch.randn(7)
        a, b = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())

        def f(x):
            return -(x ** 4).sum() - (x[:-1] * x[1:]).sum() + x.sum()

        kw = dict(lr=0.2, seed=9, hvp=hvp, backend=backend, d_warmup=4, update_d_every=3)
        oa = esgdm.ESGDM([a], maximize=True, **kw)
        ob = esgdm.ESGDM([b], **kw)
        f0 = f(x0).item()
        run(oa, a, lambda: f(a), 12, hvp)
        run(ob, b, lambda: -f(b), 12, hvp)
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_d"):
            assert torch.equal(oa.state[a][key], ob.state[b][key])
        assert f(a.detach()).item() > f0  # it climbed

    def test_per_group(self):
        x0 = torch.randn(5)
        up, down = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
        ref_up, ref_down = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
        groups = [{"params": [up], "maximize": True}, {"params": [down]}]
        opt = esgdm.ESGDM(groups, lr=0.3, seed=1, backend="torch")
        assert [g["maximize"] for g in opt.param_groups] == [True, False]
        ref = esgdm.ESGDM([ref_up, ref_down], lr=0.3, seed=1, backend="torch")
        run(opt, None, lambda: -(up ** 4).sum() + (down ** 4).sum(), 5, "autograd")
        run(ref, None, lambda: (ref_up ** 4).sum() + (ref_down ** 4).sum(), 5, "autograd")
        assert torch.equal(up, ref_up) and torch.equal(down, ref_down)

    def test_round_trips_and_old_checkpoints_default_to_false(self):
        p = torch.nn.Parameter(torch.randn(3))
        opt = esgdm.ESGDM([p], maximize=True, backend="torch")
        sd = opt.state_dict()
        assert sd["param_groups"][0]["maximize"] is True
        other = esgdm.ESGDM([p], backend="torch")
        other.load_state_dict(sd)
        assert other.param_groups[0]["maximize"] is True
        for key in ("maximize", "differentiable"):
            del sd["param_groups"][0][key]
        opt.load_state_dict(sd)  # a checkpoint from before these keys
        assert opt.param_groups[0]["maximize"] is False and opt.param_groups[0]["differentiable"] is False

    @pytest.mark.parametrize("value", [1, "yes", None])
    def test_non_bool_is_a_type_error(self, value):
        with pytest.raises(TypeError, match="Invalid maximize"):
            esgdm.ESGDM([torch.nn.Parameter(torch.zeros(2))], maximize=value)


class TestDifferentiable:
    """torch.optim's ``differentiable=True`` asks for a step that autograd can
    differentiate through.  ESGDM's step is in-place fused kernels and a
    Hessian-vector product, so it refuses True with a clear error (at construction or
    in a new group) and accepts False."""

    def test_false_is_accepted_true_is_refused(self):
        p = torch.nn.Parameter(torch.zeros(2))
        assert esgdm.ESGDM([p], differentiable=False).param_groups[0]["differentiable"] is False
        with pytest.raises(ValueError, match="differentiable=True is not supported"):
            esgdm.ESGDM([p], differentiable=True)
        opt = esgdm.ESGDM([p])
        with pytest.raises(ValueError, match="differentiable=True is not supported in param group 1"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "differentiable": True})
        assert len(opt.param_groups) == 1
        with pytest.raises(TypeError, match="Invalid differentiable"):
            esgdm.ESGDM([p], differentiable="no")


# ------------------------------------------------------------------ the first loop everyone writes

class TestPlainBackwardLoop:
    """The loop every torch.optim user writes first, ``loss.backward(); opt.step()``,
    cannot take the Hessian-vector product of ESGD-M's first ``d_warmup`` steps.  It
    must fail on step 0 with one line that says what to write instead, and the
    README's first example must be that line."""

    def recipe(self):
        text = README.read_text()
        first = re.search(r"```python\n(.*?)```", text, re.S)
        assert first.start() > text.index("## Quickstart"), "the first Python example is the Quickstart"
        lines = [line.strip() for line in first.group(1).splitlines()]
        backward = next(line for line in lines if line.startswith("loss.backward("))
        assert lines[lines.index(backward) + 1] == "opt.step()"
        return backward

    def test_error_says_in_one_line_what_to_write(self):
        p = torch.nn.Parameter(torch.randn(3))
        opt = esgdm.ESGDM([p], backend="torch")
        (p ** 4).sum().backward()
        before = p.detach().clone()
        with pytest.raises(RuntimeError) as info:
            opt.step()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"write {self.recipe()} instead of loss.backward()")
        assert "d_warmup=20" in message and "step 0" in message
        assert torch.equal(p.detach(), before) and opt.steps == 0

    def test_the_recipe_runs(self):
        p = torch.nn.Parameter(torch.randn(3))
        opt = esgdm.ESGDM([p], backend="torch")
        recipe = self.recipe()
        for _ in range(25):
            opt.zero_grad(set_to_none=True)
            loss = (p ** 4).sum()  # noqa: F841 - used by the recipe
            eval(recipe)
            opt.step()
        assert opt.steps == 25
