"""hvp="finite_difference": curvature from gradient differences, without double backward."""

import pytest
import torch
import torch.nn.functional as F

import esgdm
from esgdm.hvp import RngSnapshot, autograd_hvp, finite_difference_hvp
from helpers import rel_err

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
    model = mlp()
    closure = CountingClosure(model, torch.randn(8, 12), torch.randint(0, 4, (8,)))
    seen = {}

    class Spy(esgdm.backends.Backend):
        name = "spy"

        def why_not(self, device, dtype):
            return None

        def step(self, params, grads, exp_avgs, exp_avg_ds, hvps, scalars):
            seen["params"] = [p.detach().clone() for p in params]
            seen["grads"] = grads

    esgdm.backends.register(Spy())
    before = [p.detach().clone() for p in model.parameters()]
    opt = esgdm.ESGDM(model.parameters(), hvp="finite_difference", backend="spy")
    opt.step(closure)
    for a, b in zip(before, seen["params"]):
        assert torch.equal(a, b)  # the probe's perturbation is fully undone
    # the gradients handed to the update are those at θ, and stay in .grad
    reference = mlp()
    reference.load_state_dict({k: v for k, v in zip(model.state_dict(), before)})
    F.cross_entropy(reference(closure.x), closure.y).backward()
    for g, p, q in zip(seen["grads"], model.parameters(), reference.parameters()):
        assert torch.equal(g, q.grad) and p.grad is g


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
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
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
