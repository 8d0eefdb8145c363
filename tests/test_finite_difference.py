"""hvp="finite_difference": curvature from gradient differences, without double backward."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import esgdm
from esgdm.hvp import RngSnapshot, autograd_hvp, finite_difference_hvp

# Relative error of the finite-difference HVP against autograd, on smooth models,
# per parameter dtype and scheme (the measured values are 5-30x below these).
FD_TOLERANCE = {
    (torch.float32, "forward"): 1e-2,
    (torch.float32, "central"): 1e-3,
    (torch.float64, "forward"): 1e-6,
    (torch.float64, "central"): 1e-9,
}


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                               torch.nn.GELU(), torch.nn.Linear(32, 4))


def convnet():
    return torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.Softplus(),
                               torch.nn.Conv2d(6, 6, 3, stride=2), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 4))


INPUTS = {"mlp": (mlp, (64, 12)), "convnet": (convnet, (16, 2, 8, 8))}


def flat(ts):
    return torch.cat([t.detach().flatten().double() for t in ts])


def both_hvps(model, loss_fn, dtype, scheme):
    """(finite-difference HVP, autograd HVP) with the same sign vectors."""
    ps = [p for p in model.parameters() if p.requires_grad]
    signs = [(torch.randint(0, 2, p.shape) * 2 - 1).to(dtype) for p in ps]
    for p in ps:
        p.grad = None
    loss_fn().backward(create_graph=True)
    exact = autograd_hvp(ps, [p.grad for p in ps], signs)

    def closure():
        for p in ps:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    rng = RngSnapshot()
    closure()
    fd = finite_difference_hvp(ps, [p.grad for p in ps], signs, closure, rng, scheme)
    return fd, exact


@pytest.mark.parametrize("name", ["mlp", "convnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_fd_hvp_matches_autograd_on_smooth_models(name, dtype, scheme):
    make, shape = INPUTS[name]
    model = make().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    y = torch.randint(0, 4, (shape[0],))
    fd, exact = both_hvps(model, lambda: F.cross_entropy(model(x), y), dtype, scheme)
    err = rel_err(flat(fd), flat(exact))
    assert err < FD_TOLERANCE[dtype, scheme], err


def test_dropout_draws_the_same_masks_in_the_probe():
    model = torch.nn.Sequential(torch.nn.Linear(12, 64), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(64, 4))
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    ps = list(model.parameters())
    signs = [(torch.randint(0, 2, p.shape) * 2 - 1).float() for p in ps]

    torch.manual_seed(123)
    F.cross_entropy(model(x), y).backward(create_graph=True)
    exact = autograd_hvp(ps, [p.grad for p in ps], signs)

    def closure():
        for p in ps:
            p.grad = None
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    torch.manual_seed(123)
    rng = RngSnapshot()
    closure()
    after_main = torch.get_rng_state()
    fd = finite_difference_hvp(ps, [p.grad for p in ps], signs, closure, rng)
    assert rel_err(flat(fd), flat(exact)) < FD_TOLERANCE[torch.float32, "forward"]
    # and the random stream goes on as if the probe had not happened
    assert torch.equal(torch.get_rng_state(), after_main)


class CountingClosure:
    def __init__(self, model, x, y, fail_on_call=None):
        self.model, self.x, self.y, self.calls, self.fail_on_call = model, x, y, 0, fail_on_call

    def __call__(self):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("probe failed")
        self.model.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss


@pytest.mark.parametrize("scheme,per_d_step", [("forward", 2), ("central", 3)])
def test_one_probe_evaluation_per_d_step(scheme, per_d_step):
    model = mlp()
    closure = CountingClosure(model, torch.randn(8, 12), torch.randint(0, 4, (8,)))
    opt = esgdm.ESGDM(model.parameters(), lr=0.1, update_d_every=3, d_warmup=2,
                      hvp="finite_difference", fd_scheme=scheme, backend="torch")
    expected = 0
    for _ in range(10):
        assert opt.should_create_graph() is False
        expected += per_d_step if opt.is_d_step() else 1
        loss = opt.step(closure)
        assert closure.calls == expected
        assert torch.isfinite(loss)


def test_parameters_are_restored_bit_for_bit_and_grads_kept():
    """With lr = 0 a D-step must leave the parameters exactly as they were (the probe's
    perturbation fully undone), keep the gradients at θ in .grad, and feed the update
    those gradients: the momentum equals that of a twin stepped with autograd curvature."""
    model = mlp()
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    closure = CountingClosure(model, torch.randn(8, 12), torch.randint(0, 4, (8,)))
    before = [p.detach().clone() for p in model.parameters()]
    opt = esgdm.ESGDM(model.parameters(), lr=0.0, hvp="finite_difference", backend="torch")
    assert opt.is_d_step()
    opt.step(closure)
    assert closure.calls == 2
    for a, p in zip(before, model.parameters()):
        assert torch.equal(a, p)  # the probe's perturbation is fully undone
    twin_opt = esgdm.ESGDM(twin.parameters(), lr=0.0, backend="torch")
    F.cross_entropy(twin(closure.x), closure.y).backward(create_graph=True)
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)  # the gradient at θ, not at θ + r v
        assert torch.equal(opt.state[p]["exp_avg"], twin_opt.state[q]["exp_avg"])


def test_batchnorm_statistics_move_once():
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 4))

    model, twin = net(), net()
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    opt = esgdm.ESGDM(model.parameters(), lr=0.0, hvp="finite_difference", fd_scheme="central",
                      backend="torch")
    opt.step(CountingClosure(model, x, y))
    twin(x)  # one forward pass in training mode
    for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), name
    assert model[1].num_batches_tracked.item() == 1


def test_a_probe_that_raises_changes_nothing():
    model = mlp()
    closure = CountingClosure(model, torch.randn(8, 12), torch.randint(0, 4, (8,)))
    opt = esgdm.ESGDM(model.parameters(), lr=0.5, hvp="finite_difference", backend="torch")
    for _ in range(3):
        opt.step(closure)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: torch.as_tensor(t).clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    closure.fail_on_call = closure.calls + 2  # the probe, not the main evaluation
    with pytest.raises(RuntimeError, match="probe failed"):
        opt.step(closure)
    for a, p in zip(params, model.parameters()):
        assert torch.equal(a, p.detach())
    for k, v in opt.state_dict()["state"].items():
        for n, t in v.items():
            assert torch.equal(torch.as_tensor(t), state[k][n])
    assert opt.steps == 3


def test_d_step_without_closure_says_what_to_do():
    model = mlp()
    opt = esgdm.ESGDM(model.parameters(), hvp="finite_difference", backend="torch")
    F.cross_entropy(model(torch.randn(4, 12)), torch.randint(0, 4, (4,))).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"needs opt.step\(closure\)"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and opt.steps == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(hvp="gauss-newton"), "Invalid hvp: 'gauss-newton'"),
    (dict(hvp="finite_difference", fd_scheme="backward"), "Invalid fd_scheme: 'backward'"),
    (dict(hvp="finite_difference", fd_radius=0.0), "Invalid fd_radius: 0.0"),
])
def test_invalid_fd_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        esgdm.ESGDM(mlp().parameters(), **kwargs)


def test_frozen_parameters_and_gradient_hooks_are_respected():
    """A hook that doubles one weight's gradient runs in the probe too, so the
    finite difference of the hooked gradients doubles that block of H v; a frozen
    parameter is neither perturbed nor given a gradient."""
    model = mlp()
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    ps = [p for p in model.parameters() if p.requires_grad]
    frozen = model[0].bias.detach().clone()
    torch.manual_seed(1)
    _, exact = both_hvps(model, lambda: F.cross_entropy(model(x), y), torch.float32, "central")
    model[2].weight.register_hook(lambda g: 2 * g)  # e.g. a user's gradient scaling
    torch.manual_seed(1)
    fd, _ = both_hvps(model, lambda: F.cross_entropy(model(x), y), torch.float32, "central")
    hooked = [i for i, p in enumerate(ps) if p is model[2].weight]
    expected = [2 * h if i in hooked else h for i, h in enumerate(exact)]
    assert len(fd) == len(ps)
    assert rel_err(flat(fd), flat(expected)) < FD_TOLERANCE[torch.float32, "central"]
    assert torch.equal(model[0].bias, frozen) and model[0].bias.grad is None


class TinyTransformerLM(torch.nn.Module):
    """A pre-norm transformer block on characters, with fused attention (SDPA)."""

    def __init__(self, vocab, dim=32, heads=4, ctx=16):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(ctx, dim) * 0.02)
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, idx):
        b, t = idx.shape
        x = self.embed(idx) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


def char_batches(ctx=16, batch=16):
    text = (esgdm.ESGDM.__doc__ or "") * 4
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    gen = torch.Generator().manual_seed(0)

    def batch_fn():
        starts = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + ctx] for s in starts])
        y = torch.stack([data[s + 1:s + ctx + 1] for s in starts])
        return x, y

    return len(chars), batch_fn


def test_transformer_with_fused_attention_trains_with_finite_differences():
    vocab, next_batch = char_batches()
    torch.manual_seed(0)
    model = TinyTransformerLM(vocab)
    opt = esgdm.ESGDM(model.parameters(), lr=0.5, hvp="finite_difference", backend="torch")
    losses = []
    for _ in range(60):
        x, y = next_batch()

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # noqa: B023 (used within this iteration)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:5]) / 5


def test_transformer_curvature_matches_autograd_under_math_attention():
    """The squared-HVP estimate D after one D-step (beta2 = 0) agrees with autograd's,
    which needs the math attention backend (fused SDPA has no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    vocab, next_batch = char_batches()
    x, y = next_batch()
    torch.manual_seed(0)
    fd_model = TinyTransformerLM(vocab)
    ag_model = TinyTransformerLM(vocab)
    ag_model.load_state_dict(fd_model.state_dict())
    kwargs = dict(lr=0.0, betas=(0.9, 0.0), backend="torch")
    fd_opt = esgdm.ESGDM(fd_model.parameters(), hvp="finite_difference", fd_scheme="central",
                         generator=torch.Generator().manual_seed(5), **kwargs)
    ag_opt = esgdm.ESGDM(ag_model.parameters(), generator=torch.Generator().manual_seed(5), **kwargs)

    def closure():
        fd_opt.zero_grad()
        loss = F.cross_entropy(fd_model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return loss

    fd_opt.step(closure)
    with sdpa_kernel(SDPBackend.MATH):
        F.cross_entropy(ag_model(x).flatten(0, 1), y.flatten()).backward(create_graph=True)
    ag_opt.step()
    d_fd = flat(fd_opt.state[p]["exp_avg_d"] for p in fd_model.parameters())
    d_ag = flat(ag_opt.state[p]["exp_avg_d"] for p in ag_model.parameters())
    assert rel_err(d_fd, d_ag) < 1e-2


# --------------------------------------------------------------------------
# Compute precision: the radius follows the precision the closure computes in.
# --------------------------------------------------------------------------

from esgdm import hvp as hvp_module  # noqa: E402
from esgdm.hvp import ComputePrecision, autocast_dtype, fd_radius, param_norm, unit_roundoff  # noqa: E402

# Relative error of h against the fp32 autograd HVP when the closure runs under CPU
# autocast (measured on the test MLP: about 0.09 forward, 0.03 central for bf16;
# the radius sized for fp32 instead gives about 9 and 0.4).
AUTOCAST_TOLERANCE = 0.2


def autocast_problem(seed=0):
    torch.manual_seed(seed)
    model = mlp()
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    ps = list(model.parameters())
    signs = [(torch.randint(0, 2, p.shape) * 2 - 1).float() for p in ps]
    F.cross_entropy(model(x), y).backward(create_graph=True)
    exact = autograd_hvp(ps, [p.grad for p in ps], signs)
    for p in ps:
        p.grad = None
    return model, x, y, ps, signs, exact


class AutocastClosure:
    """Zeroes the gradients, evaluates the loss (under autocast when ``inside``) and
    calls backward; counts its calls."""

    def __init__(self, model, x, y, dtype=torch.bfloat16, inside=True):
        self.model, self.x, self.y, self.dtype, self.inside, self.calls = model, x, y, dtype, inside, 0

    def __call__(self):
        self.calls += 1
        self.model.zero_grad(set_to_none=True)
        if self.inside:
            with torch.autocast("cpu", dtype=self.dtype):
                loss = F.cross_entropy(self.model(self.x), self.y)
        else:
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("how", ["precision", "probe", "ambient"])
def test_autocast_closure_gets_a_radius_for_its_compute_dtype(dtype, scheme, how):
    """Under autocast the probe radius is sized for the autocast dtype, however the
    autocast state is learnt: a ComputePrecision around the main evaluation, the
    probe's own detection (which redoes the probe once), or autocast around the call."""
    model, x, y, ps, signs, exact = autocast_problem()
    closure = AutocastClosure(model, x, y, dtype, inside=how != "ambient")
    rng = RngSnapshot()
    with torch.autocast("cpu", dtype=dtype, enabled=how == "ambient"):
        precision = ComputePrecision() if how == "precision" else None
        with precision if precision is not None else torch.enable_grad():
            closure()
        if precision is not None:
            assert precision.dtypes == {"cpu": dtype}
            assert precision.unit_roundoff(ps) == unit_roundoff(dtype)
        closure.calls = 0
        fd = finite_difference_hvp(ps, [p.grad for p in ps], signs, closure, rng, scheme,
                                   precision=precision)
    err = rel_err(flat(fd), flat(exact))
    assert err < AUTOCAST_TOLERANCE, err
    probes = 1 if scheme == "forward" else 2
    assert closure.calls == probes + (how == "probe")  # the probe-detected case redoes one probe


@pytest.mark.parametrize("scheme,worst", [("forward", 2.0), ("central", 0.25)])
def test_autocast_with_a_radius_sized_for_float32_is_wrong(scheme, worst):
    """The failure the detection prevents: the same problem with the float32 radius."""
    model, x, y, ps, signs, exact = autocast_problem()
    closure = AutocastClosure(model, x, y)
    rng = RngSnapshot()
    closure()
    r = fd_radius(ps, None, scheme, u=unit_roundoff(torch.float32))
    fd = finite_difference_hvp(ps, [p.grad for p in ps], signs, closure, rng, scheme, radius=r)
    assert rel_err(flat(fd), flat(exact)) > worst
    assert closure.calls == 1 + (1 if scheme == "forward" else 2)  # an explicit radius is used as is


def test_compute_precision_sees_autocast_entered_inside_a_forward():
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.float16):
                return self.lin(x)

    model = Inner()
    params = list(model.parameters())
    with ComputePrecision() as seen:
        model(torch.randn(2, 4))
    assert seen.dtypes == {"cpu": torch.float16}
    assert seen.unit_roundoff(params) == unit_roundoff(torch.float16)
    # autocast leaves float64 alone, and bf16 parameters are already less precise
    assert seen.unit_roundoff([torch.zeros(3, dtype=torch.float64)]) == unit_roundoff(torch.float64)
    assert seen.unit_roundoff([torch.zeros(3, dtype=torch.bfloat16)]) == unit_roundoff(torch.bfloat16)
    # the hook is gone after the block, and nothing is seen without autocast
    with ComputePrecision() as plain:
        model.lin(torch.randn(2, 4))
    assert plain.dtypes == {} and plain.unit_roundoff(params) == unit_roundoff(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.lin(torch.randn(2, 4))
    assert plain.dtypes == {} and seen.dtypes == {"cpu": torch.float16}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_autocast_dtype_on_older_torch_api(monkeypatch):
    """torch before 2.4: is_autocast_enabled() takes no device type (it means CUDA) and
    there is no get_autocast_dtype; the per-device functions answer instead."""
    def old_is_autocast_enabled(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return False

    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(torch, "is_autocast_enabled", old_is_autocast_enabled)
        monkeypatch.delattr(torch, "get_autocast_dtype")
        assert autocast_dtype("cpu") == torch.bfloat16
        assert autocast_dtype("cuda") is None
        assert autocast_dtype("xpu") is None
        monkeypatch.undo()
    assert autocast_dtype("cpu") is None
    assert autocast_dtype("meta") is None  # a device type autocast does not know


@pytest.fixture
def one_thread():
    """bf16 matmuls on CPU are slow, and slower still with threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_under_autocast(scheme, steps=150, radius_u=None):
    """An MLP on a teacher's labels (64 inputs, 10 classes, batches of 64), its
    closure under bf16 CPU autocast: (mean of the first 5 losses, of the last 10)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    data = torch.rand(512, 64)
    labels = teacher(data * 4 - 2).argmax(1).detach()
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                torch.nn.GELU(), torch.nn.Linear(32, 10))
    radius = None if radius_u is None else fd_radius(list(model.parameters()), None, scheme, u=radius_u)
    opt = esgdm.ESGDM(model.parameters(), lr=0.5, hvp="finite_difference", fd_scheme=scheme,
                      fd_radius=radius, backend="torch")
    batches = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (64,), generator=batches)
        x, y = data[idx], labels[idx]

        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)  # noqa: B023 (used within this iteration)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    return sum(losses[:5]) / 5, sum(losses[-10:]) / 10


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_mlp_trains_under_bf16_autocast(scheme, one_thread):
    """Measured: 2.34 -> 0.92 (both schemes)."""
    first, last = train_under_autocast(scheme)
    assert last < 0.5 * first, (first, last)


def test_mlp_under_bf16_autocast_with_a_float32_radius_stalls(one_thread):
    """What the test above guards against (measured: 2.37 -> 1.95)."""
    first, last = train_under_autocast("forward", radius_u=unit_roundoff(torch.float32))
    assert last > 0.65 * first, (first, last)


def test_optimizer_learns_the_precision_from_its_main_evaluation(one_thread):
    """The optimizer wraps the main evaluation in a ComputePrecision, so a forward
    D-step under autocast costs one probe, not a probe and a redo."""
    model, x, y, *_ = autocast_problem()
    closure = AutocastClosure(model, x, y)
    opt = esgdm.ESGDM(model.parameters(), lr=0.1, update_d_every=3, d_warmup=2,
                      hvp="finite_difference", backend="torch")
    expected = 0
    for _ in range(8):
        expected += 2 if opt.is_d_step() else 1
        opt.step(closure)
        assert closure.calls == expected


# --------------------------------------------------------------------------
# Non-finite and huge parameters: the radius comes from the finite entries.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_radius_from_finite_entries_only(bad, dtype, monkeypatch):
    monkeypatch.setattr(hvp_module, "_warned", set())
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g).to(dtype) for s in [(7, 5), (13,), (0, 3), (3, 1, 2)]]
    clean = [p.clone() for p in params]
    params[1][4] = bad
    params[3][2, 0, 1] = bad
    clean[1][4] = clean[3][2, 0, 1] = 0
    expected = fd_radius(clean, None, "forward")
    with pytest.warns(RuntimeWarning, match="Inf or NaN"):
        r = fd_radius(params, None, "forward")
    assert r == pytest.approx(expected, rel=1e-6)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert fd_radius(params, None, "central") == pytest.approx(fd_radius(clean, None, "central"), rel=1e-6)


def test_huge_finite_parameters_do_not_overflow_the_norm(recwarn):
    """Squares of fp32 values above ~2e19 overflow float32: the norm is recomputed in
    float64 from the finite entries rather than read as Inf (and nothing is warned)."""
    params = [torch.full((4,), 3e30), torch.ones(2), torch.full((3,), 1e150, dtype=torch.float64)]
    assert torch.isinf(torch.linalg.vector_norm(params[0]))
    assert param_norm(params[:2]) == pytest.approx((4 * 9e60 + 2) ** 0.5, rel=1e-6)
    assert param_norm(params) == pytest.approx((4 * 9e60 + 2 + 3e300) ** 0.5, rel=1e-6)
    half = torch.full((100,), 6e4, dtype=torch.float16)  # a norm of 6e5: Inf in fp16
    assert param_norm([half]) == pytest.approx(6e5, rel=1e-3)
    assert not [w for w in recwarn if "Inf or NaN" in str(w.message)]  # all finite: no warning


def test_an_inf_in_an_unused_embedding_row_leaves_the_curvature_intact(monkeypatch):
    """One Inf where the loss does not look (an embedding row no batch uses) used to
    make the radius infinite and every h NaN; now h equals autograd's."""
    monkeypatch.setattr(hvp_module, "_warned", set())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Flatten(), torch.nn.Linear(24, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[9, 3] = float("inf")
    x, y = torch.randint(0, 9, (32, 3)), torch.randint(0, 4, (32,))
    ps = list(model.parameters())
    signs = [(torch.randint(0, 2, p.shape) * 2 - 1).float() for p in ps]
    F.cross_entropy(model(x), y).backward(create_graph=True)
    exact = autograd_hvp(ps, [p.grad for p in ps], signs)
    before = [p.detach().clone() for p in ps]
    closure = CountingClosure(model, x, y)
    rng = RngSnapshot()
    closure()
    with pytest.warns(RuntimeWarning, match="Inf or NaN"):
        fd = finite_difference_hvp(ps, [p.grad for p in ps], signs, closure, rng, "central")
    assert all(torch.isfinite(h).all() for h in fd)
    assert rel_err(flat(fd), flat(exact)) < FD_TOLERANCE[torch.float32, "central"]
    assert all(torch.equal(a, p) for a, p in zip(before, ps))  # the Inf is back in place, too


def test_param_norm_reads_the_host_once_per_call(monkeypatch):
    """One stacked reduction, not a host read per parameter."""
    params = [torch.randn(5, 3) for _ in range(20)] + [torch.randn(4, dtype=torch.float64)]
    reads = []
    for name in ("item", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or _o(self, *a, **k))
    norm = param_norm(params)
    monkeypatch.undo()
    assert len(reads) == 1, reads
    assert norm == pytest.approx(flat(params).norm().item(), rel=1e-6)


# --------------------------------------------------------------------------
# DTensor parameters (FSDP2): the radius is global, the same on every rank.
# --------------------------------------------------------------------------

import copy  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _radius_tensors():
    """Full tensors with shapes that do not split evenly over 2 ranks, and an Inf."""
    g = torch.Generator().manual_seed(7)
    shapes = [(7, 5), (13,), (3, 4), (5, 3), (0, 3), (9, 2)]
    ts = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ts[0][6, 2] = float("inf")  # in the last rank's rows of a (7, 5) tensor
    return ts


def _dtensor_checks(rank, world):
    """fd_radius over DTensors vs the whole tensors, and an FSDP2 finite-difference
    HVP vs autograd on one process; returns the numbers for the caller to compare."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    full = _radius_tensors()
    placed = [(mesh, [Shard(0)]), (mesh, [Shard(0)]), (mesh, [Replicate()]), (mesh, [Shard(1)]),
              (mesh, [Shard(0)]), (mesh2, [Replicate(), Shard(0)])]  # the last: HSDP-like
    dts = [distribute_tensor(t, m, pl) for t, (m, pl) in zip(full, placed)]
    clean = [torch.where(torch.isfinite(t), t, 0) for t in full]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        radii = {s: (fd_radius(dts, None, s), fd_radius(full, None, s)) for s in ("forward", "central")}
    radii["clean"] = fd_radius(clean, None, "forward")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3)).double()
    reference = copy.deepcopy(model)
    fully_shard(model, mesh=mesh)
    x = torch.randn(8 * world, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8 * world,), generator=torch.Generator().manual_seed(2))
    mine = slice(8 * rank, 8 * (rank + 1))
    ps = list(model.parameters())
    full_signs = [(torch.randint(0, 2, p.shape, generator=torch.Generator().manual_seed(10 + i)) * 2 - 1).double()
                  for i, p in enumerate(ps)]
    signs = [distribute_tensor(v, p.device_mesh, p.placements) for v, p in zip(full_signs, ps)]

    def closure():
        model.zero_grad()
        loss = F.cross_entropy(model(x[mine]), y[mine])  # FSDP2 averages the ranks' gradients
        loss.backward()
        return loss

    rng = RngSnapshot()
    closure()
    before = [p.full_tensor().clone() for p in ps]
    grads = [p.grad for p in ps]
    fd = finite_difference_hvp(ps, grads, signs, closure, rng, "forward")
    after = [p.full_tensor() for p in ps]
    qs = list(reference.parameters())
    F.cross_entropy(reference(x), y).backward(create_graph=True)
    exact = autograd_hvp(qs, [q.grad for q in qs], full_signs)
    return {
        "radii": radii,
        "fsdp_radius": (fd_radius(ps, None, "forward"), fd_radius(qs, None, "forward")),
        "hvp_err": rel_err(flat(h.full_tensor() for h in fd), flat(exact)),
        "restored": all(torch.equal(a, b) for a, b in zip(before, after)) and all(
            p.grad is g for p, g in zip(ps, grads)),
    }


def _check_dtensor_results(out):
    for scheme in ("forward", "central"):
        sharded, whole = out["radii"][scheme]
        assert sharded == pytest.approx(whole, rel=1e-12), scheme
    assert out["radii"]["forward"][0] == pytest.approx(out["radii"]["clean"], rel=1e-12)
    assert out["fsdp_radius"][0] == pytest.approx(out["fsdp_radius"][1], rel=1e-12)
    assert out["hvp_err"] < FD_TOLERANCE[torch.float64, "forward"], out["hvp_err"]
    assert out["restored"]


def _dtensor_worker(rank, world, out_dir):
    # a file store in the test's folder: no port to find free and lose to another process
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        torch.save(_dtensor_checks(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_dist
def test_dtensor_radius_and_fsdp2_hvp_on_one_rank():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _check_dtensor_results(_dtensor_checks(0, 1))
    finally:
        dist.destroy_process_group()


@needs_dist
@pytest.mark.slow  # two processes that import torch: ~10 s on an idle 2-core machine
def test_dtensor_radius_and_fsdp2_hvp_on_two_ranks(tmp_path):
    """Uneven shards, a replicated tensor, a 2-D mesh with a replicated dimension,
    and an Inf on one rank only: both ranks get the radius one process would, and
    the FSDP2 finite-difference HVP matches autograd on the whole batch."""
    mp.start_processes(_dtensor_worker, args=(2, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for out in outs:
        _check_dtensor_results(out)
    assert outs[0]["radii"] == outs[1]["radii"]  # bit for bit alike on the ranks


# --------------------------------------------------------------------------
# Nothing global: no module hooks, reruns that leave no trace.
# --------------------------------------------------------------------------


def test_the_probe_installs_no_global_module_hooks():
    """Global nn.Module hooks run for every thread's modules and are traced by Dynamo
    into compiled models; the probe must not need them."""
    from torch.nn.modules import module as nn_module

    model = mlp()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    seen = []

    def closure():
        seen.append(len(nn_module._global_forward_pre_hooks) + len(nn_module._global_forward_hooks))
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt = esgdm.ESGDM(model.parameters(), lr=0.1, hvp="finite_difference", fd_scheme="central",
                      backend="torch")
    opt.step(closure)
    assert seen == [0, 0, 0]


class RefusesCreateGraph(torch.autograd.Function):
    """Identity whose backward refuses create_graph=True, as a torch.compile'd backward
    with donated buffers does."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # backward(create_graph=True)
            raise RuntimeError("This backward function was compiled with non-empty donated buffers "
                               "which requires create_graph=False and retain_graph=False.")
        return g


def test_auto_reruns_an_evaluation_whose_backward_refuses_create_graph():
    """hvp="auto": the closure's own backward(create_graph=True) raises on the first
    D-step; the step warns once, reruns the closure (same dropout masks, BatchNorm
    statistics moved once) and takes finite differences from then on."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                   torch.nn.Dropout(0.3), torch.nn.Linear(16, 4))

    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    results = {}
    for hvp in ("auto", "finite_difference"):
        model = net()
        masks = []
        model[3].register_forward_hook(lambda m, args, out: masks.append(out != 0))  # noqa: B023 (used within this iteration)
        opt = esgdm.ESGDM(model.parameters(), lr=0.3, hvp=hvp, backend="torch", seed=1)
        torch.manual_seed(7)

        def closure():
            opt.zero_grad(set_to_none=True)  # noqa: B023 (used within this iteration)
            loss = F.cross_entropy(RefusesCreateGraph.apply(model(x)), y)  # noqa: B023 (used within this iteration)
            loss.backward(create_graph=opt.should_create_graph())  # noqa: B023 (used within this iteration)
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step(closure)
        results[hvp] = (model, masks, torch.get_rng_state(),
                        [w for w in caught if "finite differences from now on" in str(w.message)])
    model, masks, rng, fallbacks = results["auto"]
    twin, twin_masks, twin_rng, none = results["finite_difference"]
    assert len(fallbacks) == 1 and "donated buffers" in str(fallbacks[0].message) and not none
    assert len(masks) == len(twin_masks) + 1  # the evaluation that raised, then its rerun
    assert torch.equal(masks[0], masks[1])  # the rerun drew what the first attempt drew
    for a, b in zip(masks[1:], twin_masks):
        assert torch.equal(a, b)
    assert torch.equal(rng, twin_rng)
    assert model[1].num_batches_tracked.item() == 3
    for a, b in zip(list(model.parameters()) + list(model.buffers()),
                    list(twin.parameters()) + list(twin.buffers())):
        assert torch.equal(a, b)


def test_a_closure_using_torch_func_runs_without_the_saved_tensor_hooks():
    """torch.func transforms refuse to run under saved-tensor hooks (which the
    precision detection uses): the evaluation is rerun without them, once, and the
    run is the one an ordinary closure gives."""
    from torch.func import functional_call, grad

    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    runs = {}
    for how in ("func", "autograd"):
        torch.manual_seed(0)
        model = mlp()
        opt = esgdm.ESGDM(model.parameters(), lr=0.3, hvp="finite_difference", backend="torch", seed=2)
        calls = [0]

        def closure():
            calls[0] += 1  # noqa: B023 (used within this iteration)
            opt.zero_grad(set_to_none=True)  # noqa: B023 (used within this iteration)
            if how == "autograd":  # noqa: B023 (used within this iteration)
                loss = F.cross_entropy(model(x), y)  # noqa: B023 (used within this iteration)
                loss.backward()
                return loss
            params = {k: v.detach() for k, v in model.named_parameters()}  # noqa: B023 (used within this iteration)
            grads = grad(lambda ps: F.cross_entropy(functional_call(model, ps, (x,)), y))(params)  # noqa: B023 (used within this iteration)
            for name, p in model.named_parameters():  # noqa: B023 (used within this iteration)
                p.grad = grads[name]
            return torch.zeros(())

        for _ in range(3):
            opt.step(closure)
        runs[how] = (model, calls[0])
    (model, calls), (twin, twin_calls) = runs["func"], runs["autograd"]
    assert calls == twin_calls + 1  # the first evaluation, refused, then rerun
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compute_precision_keeps_the_saved_tensor_hooks_already_active():
    """The saved-tensor hooks that watch the precision pass every tensor on to the
    hooks that were active (torch.autograd.graph.save_on_cpu, a user's own)."""
    model = mlp()
    x = torch.randn(8, 12)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.dtype)
        return ("mine", t.detach())

    def unpack(box):
        unpacked.append(box[0])
        return box[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        with ComputePrecision() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float().sum()
        out.backward()
    assert seen.dtypes == {"cpu": torch.bfloat16}
    assert packed and len(unpacked) == len(packed) and set(unpacked) == {"mine"}
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference(x).float().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


# ---------------------------------------------- the probe's signs drawn as they are added

import esgdm.curvature as curvature_module  # noqa: E402
from esgdm.backends import cpp_impl  # noqa: E402

needs_add_signs = pytest.mark.skipif(cpp_impl._C is None or not hasattr(cpp_impl._C, "add_signs_"),
                                     reason="esgdm._C (with add_signs_) is not built")


@needs_add_signs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [1.2345e-3, -0.3, 3.0])
def test_add_signs_is_foreach_add_of_the_drawn_signs(dtype, alpha):
    """esgdm._C.add_signs_ adds the signs of esgdm.signs.rademacher with torch's rounding
    of add(alpha=): alpha in the tensor's dtype, the sum rounded once; inf, NaN and -0.0
    included; the backups hold the values before."""
    from esgdm.signs import rademacher, stream_key
    g = torch.Generator().manual_seed(0)
    ts = [(torch.randn(s, generator=g, dtype=torch.float64) * 10).to(dtype) for s in [(70001,), (3, 5), (1,), (0,)]]
    ts[0][:4] = torch.tensor([float("inf"), float("nan"), -0.0, 6e4]).to(dtype)
    want = [t.clone() for t in ts]
    torch._foreach_add_(want, [rademacher(5, 17, k, t.shape, dtype=dtype, device="cpu", start=64)
                               for k, t in enumerate(ts)], alpha=alpha)
    got, backups = [t.clone() for t in ts], [torch.empty_like(t) for t in ts]
    cpp_impl._C.add_signs_(got, [stream_key(5, 17, k) for k in range(len(ts))], [64] * len(ts), alpha, backups)
    for a, b, before, saved in zip(got, want, ts, backups):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
        assert torch.equal(saved.nan_to_num(), before.nan_to_num())


@needs_add_signs
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_signs_give_the_drawn_signs_trajectory(monkeypatch, scheme, dtype):
    """Training with finite differences: the signs drawn inside the add (the default on
    CPU) and drawn as tensors give the same parameters and state, bit for bit (a complex
    parameter included)."""
    results = []
    for fused in (True, False):
        monkeypatch.setattr(curvature_module, "USE_ADD_SIGNS", fused)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)
        z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
        x, y = torch.randn(8, 12, dtype=dtype), torch.randint(0, 4, (8,))
        params = list(model.parameters()) + ([z] if dtype == torch.float32 else [])
        opt = esgdm.ESGDM(params, lr=0.1, hvp="finite_difference", fd_scheme=scheme, update_d_every=2,
                          backend="cpu", seed=4)

        def closure(opt=opt, model=model, x=x, y=y, z=z):
            opt.zero_grad()
            loss = F.cross_entropy(model(x).float(), y) + (z.abs() ** 2).sum() * (dtype == torch.float32)
            loss.backward()
            return loss
        for _ in range(5):
            opt.step(closure)
        results.append([p.detach().clone() for p in params]
                       + [t.clone() for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_add_signs
def test_a_refused_fused_add_leaves_the_parameters_alone(monkeypatch):
    """If the fused add refuses its input (it checks everything before writing), the
    probe restores nothing from a backup it never took: the parameters keep their values."""
    model = mlp()
    closure = CountingClosure(model, torch.randn(8, 12), torch.randint(0, 4, (8,)))
    opt = esgdm.ESGDM(model.parameters(), lr=0.5, hvp="finite_difference", backend="cpu")
    before = [p.detach().clone() for p in model.parameters()]

    def refuse(*args, **kwargs):
        raise RuntimeError("add_signs_ refused")
    monkeypatch.setattr(curvature_module, "_add_signs_op", lambda shards: refuse)
    with pytest.raises(RuntimeError, match="add_signs_ refused"):
        opt.step(closure)
    for a, p in zip(before, model.parameters()):
        assert torch.equal(a, p.detach())


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_a_closure_that_sets_an_expanded_gradient_steps_like_its_copy(scheme):
    """The probe's gradient may be whatever the closure sets, an expanded tensor too (a
    gradient of a broadcast): stepped as its contiguous copy would be (before, the
    probe's in-place subtraction raised torch's "more than one element of the
    written-to tensor refers to a single memory location")."""
    results = []
    for expanded in (False, True):
        w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12).reshape(3, 4))
        opt = esgdm.ESGDM([w], lr=0.3, seed=2, hvp="finite_difference", fd_scheme=scheme, backend="torch")

        def closure(w=w, opt=opt, expanded=expanded):
            opt.zero_grad(set_to_none=True)
            row = (w.detach().sum(0, keepdim=True) ** 3)  # one row, the same for every row of w
            loss = (w * row).sum()
            w.grad = row.expand(3, 4) if expanded else row.expand(3, 4).contiguous()
            return loss

        for _ in range(3):
            opt.step(closure)
        results.append(w.detach().clone())
    assert torch.equal(*results)
