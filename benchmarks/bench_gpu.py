"""GPU figures that bench_step.py does not take: host cost, launches, whole training steps.

Five measurements, each printed as one markdown table (and written with --markdown):

1. **Host time per plain step** against the tensor count (1M fp32 elements split into
   1, 64, 1024 and 4096 tensors, each its own allocation or views of one buffer), for
   every esgdm backend that runs on the device and for ``AdamW(fused=True)`` and
   ``(foreach=True)``: the wall time of ``opt.step()`` without CUDA graphs, where the
   GPU work per step is a few microseconds, so the host sets the pace.
1b. **The Triton launcher's address-table refresh** (``--only tables``), host only.
2. **Launches per step** under ``torch.profiler``: GPU kernels launched by one plain
   step and one D-step (HVP excluded: the gradients are given).
3. **Eager against compiled step**: ``torch.compile(opt.step)``, with and without
   ``fullgraph=True``, against ``opt.step``.
4. **A whole training step of a small GPT** (forward, backward, optimizer) with the
   optimizer step eager and captured in a CUDA graph, against ``AdamW(fused=True)``
   the same way; ESGD-M runs 1 D-step in 10 (finite differences) outside the graph.

    python benchmarks/bench_gpu.py --markdown gpu_extras.md
    python benchmarks/bench_gpu.py --device cpu --quick      # checks that it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: --triton-no-launch: the "triton" backend's host work on CPU tensors, its kernel launch
#: replaced by a no-op (the interpreter mode lets the backend take CPU tensors; it must be
#: chosen before esgdm's kernels are imported).
TRITON_NO_LAUNCH = "--triton-no-launch" in sys.argv[1:]
if TRITON_NO_LAUNCH:
    os.environ["TRITON_INTERPRET"] = "1"

import esgdm  # noqa: E402
from esgdm import backends  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpu_backends(device: torch.device) -> list[str]:
    if TRITON_NO_LAUNCH:
        return ["triton", "cpu"]
    names = ["triton", "cuda", "torch"] if device.type == "cuda" else ["cpu", "torch"]
    return [n for n in names if backends.get(n).why_not(device, torch.float32) is None]


def _no_launch() -> None:
    """Replaces the Triton step kernel's launch by a no-op (--triton-no-launch)."""
    from esgdm.kernels import esgdm_step

    esgdm_step.launch = lambda *args, **kwargs: None


def _params(count: int, numel: int, device: torch.device, flat: bool = False) -> list[torch.Tensor]:
    """``count`` parameters of ``numel // count`` elements with gradients: each its own
    allocation, or (``flat``) views of one parameter buffer and one gradient buffer, as
    trainers that keep contiguous parameter and gradient buffers have them."""
    gen = torch.Generator(device=device).manual_seed(0)
    per = max(1, numel // count)
    if flat:
        data = torch.randn(count * per, generator=gen, device=device)
        grads = torch.randn(count * per, generator=gen, device=device)
        params = [torch.nn.Parameter(data[i * per:(i + 1) * per]) for i in range(count)]
        for i, p in enumerate(params):
            p.grad = grads[i * per:(i + 1) * per]
        return params
    params = [torch.randn(per, generator=gen, device=device).requires_grad_() for _ in range(count)]
    for p in params:
        p.grad = torch.randn(per, generator=gen, device=device)
    return params


def _make(name: str, params, lr_tensor: bool = False):
    if name == "AdamW(fused)":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if name == "AdamW(foreach)":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    lr = torch.tensor(1e-3, device=params[0].device) if lr_tensor else 1e-3
    opt = esgdm.ESGDM(params, lr=lr, backend=name, d_warmup=1, update_d_every=10**9)
    grads = [p.grad for p in params]
    with torch.enable_grad():  # the first step is a D-step: gradients with a graph
        loss = sum((p * p).sum() for p in params) * 0.5
        gs = torch.autograd.grad(loss, params, create_graph=True)
    for p, g in zip(params, gs):
        p.grad = g
    opt.step()
    for p, g in zip(params, grads):
        p.grad = g
    return opt


def host_time(device, counts, numel, repeats, steps, layouts=("separate", "flat"), evict_bytes=0):
    """Median wall time of one eager plain step (ms) and its host share, per tensor
    count, optimizer and memory layout (``separate``: each tensor its own allocation;
    ``flat``: views of one buffer, see :func:`_params`).  The optimizers of one count
    are timed interleaved, round by round.  With ``evict_bytes``, a buffer of that size
    is written before every step, outside the timing, as a forward and backward pass
    would: each step then starts with the tensors' metadata and memory out of the caches
    (and is timed alone, synchronised)."""
    junk = torch.empty(evict_bytes, dtype=torch.uint8, device=device) if evict_bytes else None
    rows = []
    # "<kernel> (no plan)": the same kernel through the front-end's general path (what
    # D-steps, the "triton" and "torch" backends and any unusual step take), timed with
    # esgdm.store.USE_PLAN off around its rounds only.
    names = gpu_backends(device)
    names += [f"{n} (no plan)" for n in names if n in ("cpu", "cuda")] + ["AdamW(fused)", "AdamW(foreach)"]
    for count in counts:
        runs = []
        for layout in layouts:
            for name in names:
                params = _params(count, numel, device, flat=layout == "flat")
                opt = _make(name.removesuffix(" (no plan)"), params, lr_tensor=True)
                for _ in range(3):
                    opt.step()
                runs.append((name, layout, opt, params, [], []))
        sync(device)
        for _ in range(repeats):
            for name, _layout, opt, _kept, walls, hosts in runs:
                esgdm.store.USE_PLAN = not name.endswith("(no plan)")
                t0 = time.perf_counter()
                host = wall = 0.0
                for _ in range(steps):
                    if junk is not None:
                        junk.add_(1)
                        sync(device)
                    h0 = time.perf_counter()
                    opt.step()
                    host += time.perf_counter() - h0
                    if junk is not None:
                        sync(device)
                        wall += time.perf_counter() - h0
                sync(device)
                if junk is None:
                    wall = time.perf_counter() - t0
                walls.append(wall / steps * 1e3)
                hosts.append(host / steps * 1e3)
            esgdm.store.USE_PLAN = True
        for name, layout, _opt, _kept, walls, hosts in runs:
            rows.append((count, name, layout, statistics.median(walls), statistics.median(hosts)))
        del runs
    return rows


def launcher_tables(device, counts, numel, repeats, steps):
    """Host ms per call of the Triton launcher's address-table refresh
    (``esgdm.kernels.esgdm_step._addresses``) for a plain step whose gradients moved
    (as after ``zero_grad(set_to_none=True)``), with the pointers read by one C++ call
    (``esgdm._C.data_ptrs``) and by a Python call per tensor.  Host work only: it runs on
    CPU tensors too, no kernel is launched."""
    from esgdm.kernels import esgdm_step as K

    rows = []
    for count in counts:
        per = max(1, numel // count)
        ps = [torch.randn(per, device=device) for _ in range(count)]
        state = [[torch.zeros(per, device=device) for _ in range(count)] for _ in range(2)]
        grads = [[torch.randn(per, device=device) for _ in range(count)] for _ in range(2)]
        real_op = K._data_ptrs_op
        times: dict[str, list[float]] = {"C++": [], "Python": []}
        for _ in range(repeats):
            for label, op in (("C++", real_op), ("Python", lambda: None)):
                K._data_ptrs_op = op
                try:
                    t0 = time.perf_counter()
                    for k in range(steps):
                        K._addresses(ps, grads[k % 2], *state, None, None, None, device)
                    times[label].append((time.perf_counter() - t0) / steps * 1e3)
                finally:
                    K._data_ptrs_op = real_op
        for label, ts in times.items():
            rows.append((count, label, statistics.median(ts)))
    return rows


def _kernels_launched(fn, device) -> int:
    """GPU kernels that one call of ``fn`` launches, counted by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def launches(device, numel, count):
    """GPU kernels launched by one plain step and one D-step (given HVPs)."""
    out = []
    for name in gpu_backends(device) + ["AdamW(fused)", "AdamW(foreach)"]:
        params = _params(count, numel, device)
        opt = _make(name, params, lr_tensor=True)
        opt.step()
        sync(device)
        out.append((name, "plain", _kernels_launched(opt.step, device)))
        if isinstance(opt, esgdm.ESGDM):
            opt.update_d_every = 1  # the next step is a D-step
            with torch.enable_grad():
                loss = sum((p * p).sum() for p in params) * 0.5
                gs = torch.autograd.grad(loss, params, create_graph=True)
            for p, g in zip(params, gs):
                p.grad = g
            sync(device)
            # the HVP's own backward kernels are in this count too
            out.append((name, "D-step incl. HVP of 0.5*sum(p^2)", _kernels_launched(opt.step, device)))
        del opt, params
    return out


def _guards_of(method) -> int | None:
    """Leaf guards Dynamo checks before each call of the newest compiled code of
    ``method`` (a bound ``opt.step``); None where this torch does not show them."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(method.__func__.__code__)

        def count(manager) -> int:
            return len(manager.get_leaf_guards()) + sum(map(count, manager.get_child_managers()))

        return count(entries[0].guard_manager.root) if entries else None
    except Exception:  # noqa: BLE001 - a private API: only a figure is lost
        return None


def compiled_vs_eager(device, numel, count, repeats, steps):
    """ms per plain step, eager against ``torch.compile(opt.step)`` (the default: on the
    CPU, esgdm's step leaves the graph) and ``torch.compile(opt.step, fullgraph=True)``
    (traced whole): each esgdm backend, and torch's fused AdamW for scale (what compiling
    a one-kernel optimizer step costs in guards and wrappers, whoever writes the kernel);
    esgdm's compiled rows also give the number of guards Dynamo checks per call."""
    rows = []
    for name in [*gpu_backends(device), "AdamW(fused)"]:
        for fullgraph in (False, True):
            torch._dynamo.reset()  # (compiled code is cached per function, fullgraph or not)
            params = _params(count, numel, device)
            opt = _make(name, params, lr_tensor=True)
            fn = torch.compile(opt.step, fullgraph=fullgraph)
            try:
                for _ in range(12):  # the step counters cause a recompilation or two first
                    fn()
            except Exception as e:  # noqa: BLE001 - a row that cannot be compiled whole
                rows.append((name, "compiled, fullgraph", float("nan"), f"fails: {type(e).__name__}"))
                continue
            sync(device)
            runs = (("compiled, fullgraph", fn),) if fullgraph else (("eager", opt.step), ("compiled", fn))
            for label, call in runs:
                times = []
                for _ in range(repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        call()
                    sync(device)
                    times.append((time.perf_counter() - t0) / steps * 1e3)
                # (esgdm's traced step is one frame; torch's AdamW breaks into several, not counted)
                guards = (_guards_of(opt.step) if label != "eager" and isinstance(opt, esgdm.ESGDM)
                          else None)
                rows.append((name, label, statistics.median(times), "" if guards is None else str(guards)))
            del opt, params, fn
    return rows


def compiled_train_steps(device, repeats, steps):
    """ms per whole training step of the demo's MLP (batch 128, default D-step schedule,
    steady state): the optimizer step eager, ``torch.compile(opt.step)`` and, for plain
    steps only, ``torch.compile(opt.step, fullgraph=True)`` (its D-steps eager); with
    ``hvp="autograd"`` (double backward, no closure) and ``"finite_difference"`` (the
    closure passed on D-steps only).  The three are timed interleaved, round by round."""
    from esgdm.demo import make_model

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(128, 64, generator=gen, device=device)
    y = torch.randint(0, 10, (128,), generator=gen, device=device)
    rows = []
    for hvp in ("autograd", "finite_difference"):
        torch._dynamo.reset()
        runs = []
        for label in ("eager", "compiled", "compiled, fullgraph"):
            model = make_model(0).to(device)
            opt = esgdm.ESGDM(model.parameters(), lr=0.1, hvp=hvp)
            fn = opt.step if label == "eager" else torch.compile(opt.step, fullgraph=label.endswith("fullgraph"))
            d_fn = opt.step if label.endswith("fullgraph") else fn  # (fullgraph: D-steps eager)

            def train_step(model=model, opt=opt, fn=fn, d_fn=d_fn, hvp=hvp):
                d_step = opt.is_d_step()
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward(create_graph=opt.should_create_graph())
                if not d_step:
                    fn()
                elif hvp == "autograd":
                    d_fn()
                else:
                    def closure():
                        opt.zero_grad()
                        out = torch.nn.functional.cross_entropy(model(x), y)
                        out.backward()
                        return out
                    d_fn(closure)

            for _ in range(40):  # the D-step warm-up, then the compilations
                train_step()
            runs.append((label, train_step, []))
        sync(device)
        for _ in range(repeats):
            for _label, train_step, times in runs:
                t0 = time.perf_counter()
                for _ in range(steps):
                    train_step()
                sync(device)
                times.append((time.perf_counter() - t0) / steps * 1e3)
        rows += [(hvp, label, statistics.median(times)) for label, _, times in runs]
    return rows


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab=4096, d=512, layers=6, heads=8, ctx=256):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(ctx, d) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                                 norm_first=True, activation="gelu")
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        x = self.blocks(x, mask=self.mask[: idx.shape[1], : idx.shape[1]], is_causal=True)
        return self.head(self.norm(x))


def train_step_times(device, repeats, steps, batch=16, ctx=256, quick=False):
    """ms per whole training step, steady state (1 D-step in 10 for ESGD-M)."""
    kw = dict(d=128, layers=2, ctx=64, vocab=512) if quick else dict(ctx=ctx)
    configs = [("AdamW(fused)", None, False), ("AdamW(fused)", None, True)]
    configs += [("ESGD-M", b, g) for b in gpu_backends(device) if b != "torch" for g in (False, True)]
    return [_train_one(device, name, backend, graphed, kw, batch, repeats, steps)
            for name, backend, graphed in configs if not (graphed and device.type != "cuda")]


def _train_one(device, name, backend, graphed, kw, batch, repeats, steps):
    torch.manual_seed(0)
    model = TinyGPT(**kw).to(device)
    n = sum(p.numel() for p in model.parameters())
    vocab, ctx = model.head.out_features, kw["ctx"]
    x = torch.randint(0, vocab, (batch, ctx), device=device)
    y = torch.randint(0, vocab, (batch, ctx), device=device)
    lr = torch.tensor(3e-4 if backend is None else 0.3, device=device)
    if backend is None:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=graphed)
    else:
        opt = esgdm.ESGDM(model.parameters(), lr=lr, backend=backend, hvp="finite_difference",
                          capturable=graphed, d_warmup=1, update_d_every=10, lr_warmup=0)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return loss

    graph = None
    if graphed:
        closure()
        opt.step(closure) if backend is not None else opt.step()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                opt.step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()

    def train_step(k):
        if backend is not None and (_is_dstep(opt) or (graph is not None and k % 10 == 0)):
            # A D-step, eager (closure and probe).  Graph replays do not advance the
            # host schedule, so with a graph every 10th step is made a D-step here.
            opt._schedule.since_d = max(opt._schedule.since_d, opt.update_d_every)
            opt.step(closure)
            return
        closure()
        if graph is not None:
            graph.replay()
        else:
            opt.step()

    for k in range(12):
        train_step(k)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in range(steps):
            train_step(k)
        sync(device)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    return (name, backend or "-", "graphed step" if graphed else "eager step", n, statistics.median(times))


def _is_dstep(opt) -> bool:
    """Whether opt's next step refreshes curvature (finite differences need the closure)."""
    s = opt._schedule
    return s.steps < opt.d_warmup or s.since_d >= opt.update_d_every


class Report(list):
    """The tables so far: each printed, and the markdown file written again, as it is
    added, so that a time limit that stops the run keeps what was measured."""

    def __init__(self, path: str | None, first: str):
        super().__init__()
        self.path = path
        self.append(first)

    def append(self, section: str) -> None:
        super().append(section)
        print(section + "\n", flush=True)
        if self.path:
            with open(self.path, "w") as f:
                f.write("\n\n".join(self) + "\n")


def table(header, rows, fmt):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that it runs")
    ap.add_argument("--only", default="host,tables,launches,compile,train",
                    help="comma-separated subset of host,tables,launches,compile,train")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="training steps per timed round of the train rows (default 20, 3 with --quick; "
                         "a multiple of 10 covers whole D-step periods)")
    ap.add_argument("--evict-mib", type=int, default=0,
                    help="host rows: write a buffer of this many MiB before every step (outside the "
                         "timing), so that steps start from cold caches as after a forward and backward")
    ap.add_argument("--triton-no-launch", action="store_true",
                    help="host rows on a CPU: the 'triton' backend's host work per plain step (front-end, "
                         "checks, launcher tables) with its kernel launch replaced by a no-op, next to the "
                         "'cpu' backend; in Triton's interpreter mode, set before esgdm is imported")
    ap.add_argument("--compile-tensors", type=int, default=148,
                    help="compile rows: the number of parameter tensors (default 148, GPT-2's count); "
                         "tracing takes longer the more there are")
    ap.add_argument("--markdown", help="write the tables to this path")
    args = ap.parse_args(argv)
    if args.triton_no_launch:
        if args.device != "cpu" or not TRITON_NO_LAUNCH:
            ap.error("--triton-no-launch runs on --device cpu, given on the command line")
        _no_launch()
    device = torch.device(args.device)
    only = set(args.only.split(","))
    quick = args.quick
    numel = (1 << 16) if quick else (1 << 20)
    repeats, steps = (3, 5) if quick else (7, 50)
    out = Report(args.markdown, f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
                                f"torch {torch.__version__}")
    if "host" in only:
        counts = (1, 64, 256) if quick else (1, 64, 1024, 4096)
        rows = host_time(device, counts, numel, repeats, steps, evict_bytes=args.evict_mib << 20)
        base = {(name, layout): wall for count, name, layout, wall, _ in rows if count == 1}
        caches = f", caches written over ({args.evict_mib} MiB) before every step" if args.evict_mib else ""
        out.append(f"### Plain step against tensor count ({numel} fp32 elements in all, eager{caches})\n\n" + table(
            ["tensors", "optimizer", "memory", "ms per step", "host ms per call", "vs 1 tensor"], rows,
            lambda r: [str(r[0]), r[1], r[2], f"{r[3]:.4f}", f"{r[4]:.4f}", f"{r[3] / base[r[1], r[2]]:.2f}x"]))
    if "tables" in only:
        counts = (64, 256) if quick else (148, 1024, 4096)
        rows = launcher_tables(device, counts, numel, repeats, steps)
        out.append("### Triton launcher: address-table refresh per plain step (host)\n\n" + table(
            ["tensors", "pointers read by", "host ms per call"], rows,
            lambda r: [str(r[0]), r[1], f"{r[2]:.4f}"]))
    if "launches" in only and device.type == "cuda":
        rows = launches(device, numel, 148)
        out.append("### GPU kernels launched per step (148 tensors)\n\n" + table(
            ["optimizer", "step", "kernels"], rows, lambda r: [r[0], r[1], str(r[2])]))
    if "compile" in only:
        count = args.compile_tensors
        rows = compiled_vs_eager(device, numel * (1 if quick else 16), count, repeats, steps)
        out.append(f"### Eager against torch.compile(opt.step), plain step, {count} tensors\n\n" + table(
            ["backend", "step", "ms", "guards per call"], rows, lambda r: [r[0], r[1], f"{r[2]:.4f}", r[3]]))
        rows = compiled_train_steps(device, max(repeats, 11), max(steps, 50))
        out.append("### Eager against torch.compile(opt.step), whole training step of the demo's MLP "
                   "(batch 128, 1 D-step in 10)\n\n" + table(
                       ["hvp", "optimizer step", "ms per training step"], rows,
                       lambda r: [r[0], r[1], f"{r[2]:.4f}"]))
    if "train" in only:
        rows = train_step_times(device, repeats, args.train_steps or (20 if not quick else 3), quick=quick)
        out.append("### Whole training step of a small GPT (batch 16 x 256 tokens)\n\n" + table(
            ["optimizer", "backend", "optimizer step", "parameters", "ms per training step"], rows,
            lambda r: [r[0], r[1], r[2], f"{r[3] / 1e6:.1f}M", f"{r[4]:.3f}"]))


if __name__ == "__main__":
    main()
