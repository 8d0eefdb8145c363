"""The device-resident step: GradScaler, found_inf, no host reads, torch.compile, capture."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import requires_cuda
from helpers import rel_err

import esgdm

BACKENDS = ["torch", "cpu"]


def _backend_or_skip(name, device="cpu"):
    from esgdm import backends

    reason = backends.get(name).why_not(torch.device(device), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    return name


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


def _train(backend, steps, scaler=None, hvp="autograd", inject_inf_at=None, **kw):
    net = _mlp()
    x, y = _data()
    opt = esgdm.ESGDM(net.parameters(), lr=0.3, backend=backend, hvp=hvp, seed=5, **kw)
    for t in range(steps):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            if scaler is not None:
                scaler.scale(loss).backward(create_graph=opt.should_create_graph())
            else:
                loss.backward(create_graph=opt.should_create_graph())
            if t == inject_inf_at:  # noqa: B023 (called in this iteration)
                next(net.parameters()).grad.view(-1)[0] = float("inf")
            return loss

        if scaler is None:
            opt.step(closure) if hvp == "finite_difference" else (closure(), opt.step())
        elif hvp == "finite_difference":
            closure()  # GradScaler checks the gradients for infs before the step
            scaler.step(opt, closure)
            scaler.update()
        else:
            closure()
            scaler.step(opt)
            scaler.update()
    return net, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_grad_scaler_follows_the_unscaled_run(backend, hvp):
    """torch.amp.GradScaler: the kernels divide g and h by the scale (h carries it
    too), so a scaled run follows the unscaled one."""
    _backend_or_skip(backend)
    plain, _ = _train(backend, 60, hvp=hvp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10)
    scaled, opt = _train(backend, 60, scaler=scaler, hvp=hvp)
    assert scaler.get_scale() > 2.0**12  # it grew: no inf was found, every step was taken
    assert opt.steps == 60
    for a, b in zip(scaled.parameters(), plain.parameters()):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_inf_found_changes_nothing(backend):
    """An inf in a gradient: GradScaler passes found_inf and the step changes nothing,
    parameters, state and counters included (decided on the device)."""
    _backend_or_skip(backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    net, opt = _train(backend, 5, scaler=scaler)
    before = [p.detach().clone() for p in net.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(net.parameters())].items()}
    counters = (opt.steps, opt.steps_since_d)
    x, y = _data()
    opt.zero_grad(set_to_none=True)
    scaler.scale(torch.nn.functional.cross_entropy(net(x), y)).backward(
        create_graph=opt.should_create_graph())
    next(net.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)
    for k, v in opt.state[next(net.parameters())].items():
        assert torch.equal(v, state[k]), k
    assert (opt.steps, opt.steps_since_d) == counters


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_parameters_train_with_grad_scaler(backend):
    _backend_or_skip(backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    net = _mlp(dtype=torch.float16)
    x, y = _data()
    opt = esgdm.ESGDM(net.parameters(), lr=0.3, backend=backend, seed=5)
    losses = []
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x.half()).float(), y)
        scaler.scale(loss).backward(create_graph=opt.should_create_graph())
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    net32, _ = _train(backend, 60)
    x, y = _data()
    loss32 = torch.nn.functional.cross_entropy(net32(x), y).item()
    loss16 = torch.nn.functional.cross_entropy(net(x.half()).float(), y).item()
    assert loss16 < losses[0] - 0.2  # it trains
    assert abs(loss16 - loss32) < 0.02 * loss32  # and follows fp32 training


def test_plain_step_reads_nothing_back_to_the_host(monkeypatch):
    """With a tensor lr, a plain step calls no .item(), .cpu(), .tolist() or .numpy()."""
    net = _mlp()
    x, y = _data()
    lr = torch.tensor(0.3)
    opt = esgdm.ESGDM(net.parameters(), lr=lr, backend="torch", d_warmup=1, update_d_every=1000)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward(create_graph=opt.should_create_graph())
        opt.step()

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")
        return call

    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        lr.mul_(0.5)  # a schedule on the tensor: picked up on the device


def test_tensor_lr_changes_are_seen_without_a_host_read():
    net_a, net_b = _mlp(), _mlp()
    x, y = _data()
    lr = torch.tensor(0.3, dtype=torch.float64)  # the table is float64: same values as floats
    opt_a = esgdm.ESGDM(net_a.parameters(), lr=lr, backend="torch", seed=1)
    opt_b = esgdm.ESGDM(net_b.parameters(), lr=0.3, backend="torch", seed=1)
    for t in range(25):
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward(create_graph=opt.should_create_graph())
            opt.step()
        lr.fill_(0.3 * 0.9 ** (t + 1))
        opt_b.param_groups[0]["lr"] = 0.3 * 0.9 ** (t + 1)
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b)


def _compiled_vs_eager(backend, fullgraph, steps=30, d_warmup=20, update_d_every=10):
    """(Without ``fullgraph`` a CPU step leaves the graph unless a test switches
    ``esgdm.traced.CPU_STEPS_LEAVE_GRAPH`` off.)"""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        net = _mlp()
        x, y = _data()
        opt = esgdm.ESGDM(net.parameters(), lr=0.3, backend=backend, seed=3,
                          d_warmup=d_warmup, update_d_every=update_d_every)
        step = torch.compile(opt.step, fullgraph=fullgraph) if compiled else opt.step
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward(create_graph=opt.should_create_graph())
            if compiled and opt.is_d_step() and fullgraph:
                opt.step()  # D-steps break the graph (autograd.grad); plain steps must not
            else:
                step()
        results.append([p.detach().clone() for p in net.parameters()])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("leave", [True, False], ids=["leaves-graph", "traced"])
def test_compiled_step_equals_eager_including_d_steps(backend, leave, monkeypatch):
    _backend_or_skip(backend)
    monkeypatch.setattr(esgdm.traced, "CPU_STEPS_LEAVE_GRAPH", leave)
    eager, compiled = _compiled_vs_eager(backend, fullgraph=False)
    for a, b in zip(eager, compiled):
        assert rel_err(b, a) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_steps_compile_with_fullgraph(backend):
    _backend_or_skip(backend)
    eager, compiled = _compiled_vs_eager(backend, fullgraph=True, steps=12, d_warmup=2, update_d_every=100)
    for a, b in zip(eager, compiled):
        assert rel_err(b, a) < 1e-6


def _many_tensors(n, numel, state_dtype, backend="torch"):
    """An optimizer over ``n`` tensors of ``numel`` elements, past its one D-step."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(numel)) for _ in range(n)]
    opt = esgdm.ESGDM(ps, lr=0.1, backend=backend, seed=3, d_warmup=1, update_d_every=10**9,
                      state_dtype=state_dtype)
    gs = torch.autograd.grad(sum((p * p).sum() for p in ps), ps, create_graph=True)
    for p, g in zip(ps, gs):
        p.grad = g  # (create_graph: the D-step's Hessian-vector products)
    opt.step()  # the D-step, eager
    return ps, opt


def _random_grad_steps(ps, step, steps=3, code_of_first=False) -> str | None:
    """``steps`` calls of ``step`` with seeded random gradients; with ``code_of_first``,
    the code Inductor generated for the first call."""
    from torch._inductor.utils import run_and_get_code

    code = None
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        if code_of_first and t == 0:
            _, codes = run_and_get_code(step)
            code = "\n".join(codes)
        else:
            step()
    return code


def _allocated_elements(code: str) -> int:
    """Elements of the buffers Inductor's generated code allocates."""
    total = 0
    for sizes in re.findall(r"empty_strided(?:_\w+)?\(\(([^)]*)\)", code):
        n = 1
        for size in filter(None, (s.strip() for s in sizes.split(","))):
            n *= int(size)
        total += n
    return total


@pytest.mark.slow
@pytest.mark.parametrize("state_dtype", [None, torch.uint8])
def test_compiled_step_on_many_tensors_copies_no_state(state_dtype):
    """Each tensor's state is a view into one flat buffer per bucket.  Handed to the
    operator as views, every view it writes made functionalization regenerate the
    buffer and the views after it: allocations and copies quadratic in the number of
    tensors (issue 19).  The compiled step allocates at most linearly in it, and steps
    as the eager one does."""
    numel = 5000 if state_dtype == torch.uint8 else 100  # 8-bit state needs >= 4096
    allocated = {}
    for n in (8, 32):
        torch._dynamo.reset()
        results = []
        for compiled in (False, True):
            ps, opt = _many_tensors(n, numel, state_dtype)
            step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
            code = _random_grad_steps(ps, step, code_of_first=compiled)
            if compiled:
                allocated[n] = _allocated_elements(code)
            state = [opt.state[p] for p in ps]
            results.append([p.detach().clone() for p in ps]
                           + [s[k].detach().clone() for s in state for k in ("exp_avg", "exp_avg_d")])
        for a, b in zip(*results):
            if a.dtype == torch.uint8:
                assert torch.equal(a, b)
            else:
                assert rel_err(b, a) < 1e-6
    assert allocated[32] <= 4 * allocated[8] + 32 * numel, allocated


def _guard_lines(step) -> list[str]:
    """The guards Dynamo builds while ``step()`` runs, one line each (its guards log)."""
    import logging

    import torch._dynamo.guards as dynamo_guards

    log = getattr(dynamo_guards, "guards_log", None)
    if log is None:
        pytest.skip("this torch has no guards log to read")
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            lines.extend(record.getMessage().splitlines())

    handler = _Collect()
    torch._logging.set_logs(guards=True)
    log.addHandler(handler)
    try:
        step()
    finally:
        log.removeHandler(handler)
        torch._logging.set_logs()
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("state_dtype", [None, torch.uint8])
def test_compiled_step_guards_no_layout_entries(state_dtype):
    """Every Python value a traced step reads is a guard checked on each call.  The
    buckets' per-tensor shapes, strides and offsets, and the metadata of the parameters
    they were built for, were compared entry by entry: about 25 guards per tensor, more
    than half of a compiled step's guards.  They are constants of the build, read
    through one serial number (esgdm.traced); the step still equals the eager one."""
    numel = 5000 if state_dtype == torch.uint8 else 100
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        ps, opt = _many_tensors(6, numel, state_dtype)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        if compiled:
            lines = _guard_lines(lambda: _random_grad_steps(ps, step))  # noqa: B023 (called here)
        else:
            _random_grad_steps(ps, step)
        results.append([p.detach().clone() for p in ps])
    assert lines, "no guards were logged: the step was not compiled"
    per_entry = [ln for ln in lines if re.search(r"meta_signature|\.(shapes|strides|offsets|qscale_starts)\[", ln)]
    assert not per_entry, per_entry[:5]
    assert any("_store.serial" in ln for ln in lines)  # what guards the build instead
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_plain_step_of_the_cpu_backend_calls_its_cpp_operator():
    """A compiled plain step of the "cpu" backend calls esgdm::step_flat_cpu_, whose
    kernel is C++, not esgdm::step_flat_, whose Python kernel converted both tensor
    lists to Python objects on every call; the steps equal the eager ones."""
    from esgdm.backends import cpp_impl

    if cpp_impl.CpuBackend.plain_flat_op is None:
        pytest.skip("esgdm._C has no esgdm::step_flat_cpu_")
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        ps, opt = _many_tensors(4, 300, None, backend="cpu")
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        code = _random_grad_steps(ps, step, code_of_first=compiled)
        if compiled:
            assert "esgdm.step_flat_cpu_" in code and "esgdm.step_flat_.default" not in code
        results.append([p.detach().clone() for p in ps] + [opt.state[p]["exp_avg"].clone() for p in ps])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_step_on_the_torch_backend_reuses_the_buckets_views(monkeypatch):
    """A compiled step of the "torch" backend hands the operator the bucket's flat
    buffers; the operator steps them through the views the bucket already holds
    rather than cutting two views per tensor on every call (1 us each), and the result
    is the eager step's."""
    cut = []
    real = esgdm.ops.state_views
    monkeypatch.setattr(esgdm.ops, "state_views", lambda *a: cut.append(1) or real(*a))
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        ps, opt = _many_tensors(8, 100, None)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        _random_grad_steps(ps, step)
        results.append([p.detach().clone() for p in ps] + [opt.state[p]["exp_avg"].clone() for p in ps])
    assert not cut
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _recorder():
    """A torch.compile backend that runs each graph as traced, and the graphs it got."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return record, graphs


def _graphs_of(step_fn, ps, steps=4):
    """The FX graphs Dynamo hands the compiler over ``steps`` calls of ``step_fn(backend)``
    (a compiled step), with the steps' gradients seeded as in :func:`_random_grad_steps`."""
    record, graphs = _recorder()
    _random_grad_steps(ps, step_fn(record), steps=steps)
    return graphs


def _esgdm_nodes(graphs) -> list[str]:
    """The nodes of ``graphs`` that esgdm's code put there (an esgdm operator, or any
    operation traced from a file of the package)."""
    return [str(n.target) for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and ("esgdm" in str(n.target)
                                              or "/esgdm/" in (n.meta.get("stack_trace") or ""))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_cpu_step_leaves_the_graph_unless_fullgraph(backend):
    """On the CPU a traced step adds Dynamo's guards and Inductor's wrapper around the
    same one-call kernel (about 3x the eager step at 148 tensors, 9x at 1,024) and no CUDA
    graph can replay it: torch.compile(opt.step) runs the step eagerly.  No graph holds
    esgdm's work, not even as a frame of one of its functions compiled on its own (what
    Dynamo does to the functions an eager frame calls after a graph break); the steps
    equal the eager ones bit for bit.  With fullgraph=True, or inside
    torch._dynamo.error_on_graph_break(True), the step is still one graph."""
    _backend_or_skip(backend)

    def compiled(rec, opt, how):
        fn = torch.compile(opt.step, backend=rec, fullgraph=how == "fullgraph")
        if how != "error_on_graph_break":
            return fn

        def strict():
            with torch._dynamo.error_on_graph_break(True):
                return fn()
        return strict

    results, found = [], {}
    for how in ("eager", "compiled", "fullgraph", "error_on_graph_break"):
        torch._dynamo.reset()
        ps, opt = _many_tensors(5, 300, None, backend=backend)
        if how == "eager":
            _random_grad_steps(ps, opt.step, steps=4)
        else:
            found[how] = _esgdm_nodes(_graphs_of(lambda rec, opt=opt, how=how: compiled(rec, opt, how), ps))
        results.append([p.detach().clone() for p in ps] + [opt.state[p]["exp_avg"].clone() for p in ps])
    assert found["compiled"] == []
    for how in ("fullgraph", "error_on_graph_break"):
        assert any("esgdm." in t for t in found[how]), (how, found[how])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


SCRIPT_TRAIN_STEP = """
def train_step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward(create_graph=opt.should_create_graph())
    opt.step()
    return loss
"""


def _train_step_of(net, opt, x, y):
    """A training step as a script writes one: the model, optimizer and batch are
    globals of its module (Dynamo specialises on a global's int attributes, where it
    makes a closed-over object's symbolic after a recompilation or two)."""
    namespace = {"torch": torch, "net": net, "opt": opt, "x": x, "y": y}
    exec(SCRIPT_TRAIN_STEP, namespace)  # noqa: S102 - a fixed string: a module's globals
    return namespace["train_step"]


def test_compiled_training_function_runs_the_cpu_step_eagerly():
    """A whole training step under torch.compile (forward, backward with
    ``create_graph=opt.should_create_graph()``, optimizer step): the step leaves the graph
    there too, nothing is compiled again once the D-step and the plain step have each been
    compiled (traced, should_create_graph's answer made the code guard on the step
    counters and compile again every step, until Dynamo's recompile limit), and training
    equals eager training."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        net = _mlp()
        x, y = _data()
        opt = esgdm.ESGDM(net.parameters(), lr=0.3, backend="torch", seed=3, d_warmup=2, update_d_every=5)
        record, graphs = _recorder()
        train_step = _train_step_of(net, opt, x, y)
        fn = torch.compile(train_step, backend=record) if compiled else train_step
        with torch._dynamo.config.patch(recompile_limit=64):
            for t in range(22):
                fn()
                if t == 11:  # D-steps at 0, 1, 6, 11, 16, 21: both kinds compiled by now
                    frames = torch._dynamo.utils.counters["frames"]["total"]
        if compiled:
            assert torch._dynamo.utils.counters["frames"]["total"] == frames
            assert graphs and _esgdm_nodes(graphs) == []
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_one_graph_demanded_outside_a_trace():
    """Asked outside a trace there is no compilation to honour: the answer is the safe one."""
    assert esgdm.traced.one_graph_demanded() is True


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_step_follows_rebuilt_buckets(fullgraph, backend, monkeypatch):
    """The trace holds the buckets' layout as constants, guarded by the build's serial
    number and each parameter's identity: whatever rebuilds the buckets (new memory
    for a parameter, found by an eager step; a new param group; a parameter object
    replaced) makes the next compiled call trace again, and every step equals eager.
    With ``fullgraph=True`` the rebuilding step is eager (building buckets is not
    traceable) and every later plain step compiles whole: a serial number that changed
    between traces must stay a constant of the trace.  (On the CPU a step leaves the
    graph unless ``fullgraph``: switched off here, to trace what a GPU traces.)"""
    _backend_or_skip(backend)
    monkeypatch.setattr(esgdm.traced, "CPU_STEPS_LEAVE_GRAPH", False)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        net = _mlp()
        x, y = _data()
        opt = esgdm.ESGDM(net.parameters(), lr=0.3, backend=backend, seed=3, d_warmup=1, update_d_every=10**9)
        step = torch.compile(opt.step, fullgraph=fullgraph) if compiled else opt.step
        extra = torch.nn.Parameter(torch.full((5,), 0.5))

        def loss_of(net=net, x=x, y=y, extra=extra):
            return torch.nn.functional.cross_entropy(net(x), y) + (extra * extra).sum()

        for t in range(14):
            opt.zero_grad(set_to_none=True)
            loss_of().backward(create_graph=opt.should_create_graph())
            if t == 4:  # new memory for a parameter: the eager step rebuilds the buckets
                net[0].weight.data = net[0].weight.data.clone()
            if t == 7:
                opt.add_param_group({"params": [extra], "lr": 0.1})
            if t == 9:  # a parameter object replaced by a fresh one (its state starts anew)
                old = net[2].bias
                net[2].bias = torch.nn.Parameter(old.detach().clone())
                net[2].bias.grad = old.grad
                opt.param_groups[0]["params"][3] = net[2].bias
            if t in (0, 4, 11) or (fullgraph and t in (7, 9)):
                opt.step()  # eager: the D-step, the rebuilding steps, and one after traced rebuilds
            else:
                step()
        results.append([p.detach().clone() for p in [*net.parameters(), extra]]
                       + [opt.state[p]["exp_avg"].clone() for p in [*net.parameters(), extra]])
        # every bucket, built eagerly or inside a trace, is numbered and owns its buffers
        for b in opt._store.buckets:
            assert b.serial and esgdm.buckets.own_state_views(b.tensors, b.exp_avg, b.exp_avg_d,
                                                              b.offsets) is not None
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ GPU twins


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_cuda_graph_capture_and_replay_equals_eager(backend):
    _backend_or_skip(backend, "cuda")
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)).cuda()
        x = torch.randn(128, 64, device="cuda")
        y = torch.randint(0, 10, (128,), device="cuda")
        lr = torch.tensor(0.3, device="cuda")
        opt = esgdm.ESGDM(net.parameters(), lr=lr, backend=backend, seed=1, capturable=True,
                          d_warmup=1, update_d_every=10**9)

        def train_step():
            loss = torch.nn.functional.cross_entropy(net(x), y)  # noqa: B023 (called in this iteration)
            loss.backward()
            opt.step()  # noqa: B023 (called in this iteration)

        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(net(x), y).backward(create_graph=True)
        opt.step()  # the D-step, eager
        for p in net.parameters():
            p.grad = p.grad.detach().zero_()
        if graphed:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    opt.zero_grad(set_to_none=False)
                    train_step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=False)
            with torch.cuda.graph(g):
                train_step()
            for _ in range(10):
                opt.zero_grad(set_to_none=False)
                g.replay()
        else:
            for _ in range(13):
                opt.zero_grad(set_to_none=False)
                train_step()
        torch.cuda.synchronize()
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        assert rel_err(b, a) < 1e-5


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_plain_steps_do_not_sync_with_the_host(backend):
    _backend_or_skip(backend, "cuda")
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)).cuda()
    x = torch.randn(128, 64, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    opt = esgdm.ESGDM(net.parameters(), lr=torch.tensor(0.3, device="cuda"), backend=backend,
                      d_warmup=1, update_d_every=10**9)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward(create_graph=opt.should_create_graph())
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
