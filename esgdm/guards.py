"""What the finite-difference probe must leave as it found it: random state, buffers,
and other threads' draws.

* :class:`RngSnapshot`: torch's CPU and CUDA random states, replayed for the probe;
* :data:`GENERATORS`: a reader-writer lock that orders the closure evaluations of every
  ESGDM optimizer of the process around those replays;
* :func:`module_trees` / :class:`ModuleTrees`: the modules that hold the parameters,
  whose buffers :class:`BufferGuard` copies before the probe and back after it;
* :func:`drain_at_exit`: in a process group, collectives issued during backward must
  be released before the interpreter finalizes (see the comment above it).

The comment below says why each is needed and what it does not cover.
"""

from __future__ import annotations

import atexit
import gc
import threading
import time
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

_lock = threading.Lock()  # registering the exit drain once


# --------------------------------------------------------------------------
# Threads and torch.compile.
#
# Nothing of the probe is visible outside the thread that runs it, except
# through torch's own generators, which are process-wide:
#   * The compute precision is learnt through saved-tensor hooks, which are
#     thread-local (above), not through global nn.Module hooks: those ran for the
#     modules of every thread, and Dynamo traced them into compiled models (and
#     failed: "... is already tracked for mutation").
#   * Buffers (BatchNorm running statistics, ...) are put back from outside the
#     model: the buffers of every module of the module trees that hold the
#     parameters are copied before the probe and copied back after it (all of them:
#     eager BatchNorm updates its running statistics without bumping their version
#     counters, so versions cannot tell which moved).  The trees are found by
#     scanning the live nn.Module objects once (module_trees; the optimizer caches
#     the roots per parameter set and walks them again at each probe).  Compiled
#     models update the same buffer tensors in place, so they are covered too; a
#     global forward hook saw only eager module calls.  Trade-off: a
#     buffer outside those trees (a loss module with a buffer and no parameters) is
#     not restored, and a model put in a common container with another thread's
#     model shares a tree with it, whose buffers the probe then copies back too
#     (give each thread its own root module).
#   * Random numbers.  The probe must draw what the main evaluation drew (dropout
#     masks), and torch's CPU generator and each CUDA device's generator are shared
#     by all threads: there is no per-thread random state to fork.  So:
#       - The generators are left alone when the main evaluation drew nothing (the
#         states before and after it are equal): models without randomness never
#         see a generator move or rewind.
#       - Otherwise the probe rewinds them to the state before the main evaluation
#         and puts back the state after it (torch.random.fork_rng semantics: the
#         probe's draws never advance the stream).  While it runs, a thread that
#         draws from the same generator would get replayed numbers and shift the
#         probe's masks, so ESGDM orders the evaluations of its closures with
#         GENERATORS, a reader-writer lock: a D-step that may rewind holds it
#         exclusively from before the main evaluation to after the probe, every
#         other closure evaluation holds it shared.  Optimizers in different
#         threads thus never see each other's rewinds, and every probe replays
#         exactly the draws of its own main evaluation.  Draws made outside
#         ESGDM.step (a forward before a closure-less step, data sampling) are
#         ordered only if that code holds the lock shared
#         (``with GENERATORS.hold(exclusive=False): ...``); otherwise they may fall
#         inside a D-step: they then get replayed numbers, shift the probe's masks,
#         and (as the states before and after the main evaluation differ) make the
#         probe rewind even for a model that draws nothing.  Which thread gets
#         which numbers of a shared generator depends on timing anyway, with any
#         optimizer, so runs with dropout in several threads are not reproducible
#         draw for draw; models that draw nothing (or draw from generators of their
#         own) give in threads exactly the numbers of a run one after the other.
#         Measured (the setting of tests/test_threads.py, 10 runs of two threads
#         training with nn.Dropout, 12 steps each): without the lock every run had
#         probes whose masks differed from their main evaluation's (54 of 120
#         D-steps), with it none (0 of 120).
#       - No lock is taken in a distributed run (more than one rank): ranks that
#         are threads of one process would wait for each other inside their closures.
# --------------------------------------------------------------------------


class RngSnapshot:
    """The CPU and CUDA random-number states, to replay them for the probe."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def same(self, other: RngSnapshot) -> bool:
        """Whether both hold the same states (nothing drew in between)."""
        if not torch.equal(self.cpu, other.cpu) or (self.cuda is None) != (other.cuda is None):
            return False
        if self.cuda is None or other.cuda is None:
            return True  # both None (checked above)
        return len(self.cuda) == len(other.cuda) and all(torch.equal(a, b) for a, b in zip(self.cuda, other.cuda))


class _GeneratorLock:
    """A reader-writer lock over the evaluations of ESGDM closures (see above):
    shared for those that keep the generators' streams, exclusive for a D-step that
    may rewind them.  Re-entrant per thread (a closure may step another optimizer:
    the inner step runs under the outer hold); writers go first."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._depth = threading.local()

    @contextmanager
    def hold(self, exclusive: bool):
        depth = getattr(self._depth, "n", 0)
        if depth or is_distributed():
            self._depth.n = depth + 1
            try:
                yield
            finally:
                self._depth.n = depth
            return
        with self._cond:
            if exclusive:
                self._writers_waiting += 1
                try:
                    while self._writer or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = True
            else:
                while self._writer or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._depth.n = 1
        try:
            yield
        finally:
            self._depth.n = 0
            with self._cond:
                if exclusive:
                    self._writer = False
                else:
                    self._readers -= 1
                self._cond.notify_all()


# At exit of a multi-process run over gloo, torch 2.14 can abort ("terminate called
# without an active exception", SIGABRT) after training finished, with any optimizer
# (measured with torch.optim.SGD and esgdm not imported: 2 of 12 runs of FSDP2 on two
# processes).  A collective issued during backward (FSDP2's reduce-scatter, DDP's
# all-reduce) keeps a copy of the thread-local state, which holds a Python object
# (the contextvars.Context that autograd stashes there for the backward); when the
# interpreter's final garbage collection frees the last reference to such a work,
# gloo's worker thread must take the GIL to release that object, Python ends the
# thread instead (it is finalizing), and the unwinding through a noexcept destructor
# calls std::terminate.  esgdm's own code starts no threads: its CPU kernel runs on
# ATen's OpenMP pool and its C++ helpers keep no state.  The way around: collect
# those objects before finalization starts, while other threads may still take the
# GIL, and let gloo's threads release them (0 of 24 runs aborted with this; the sleep
# is a bound, the threads need microseconds once scheduled).  A process group of one
# rank has these works too (FSDP2 still reduce-scatters): 7 of 300 one-process FSDP2
# runs with finite differences aborted without the drain, 0 of 300 with it
# (benchmarks/exit_abort_rate.py, two runs at once on two cores; on two processes
# 37 of 100 without, 0 of 100 with).  So it is registered
# wherever a process group exists: by the constructor and by the probe.
_exit_drain: list[bool] = []


def _drain_before_exit() -> None:
    gc.collect()
    time.sleep(0.1)


def drain_at_exit() -> None:
    """Registers :func:`_drain_before_exit` once (see above)."""
    with _lock:
        if not _exit_drain:
            _exit_drain.append(True)
            atexit.register(_drain_before_exit)


def in_process_group() -> bool:
    """Whether torch.distributed has a default process group here (of any size)."""
    dist = getattr(torch, "distributed", None)
    return dist is not None and dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """Whether this process is one of several ranks (which may be threads of one process)."""
    return in_process_group() and torch.distributed.get_world_size() > 1


#: Orders the closure evaluations of every ESGDM optimizer of this process.
GENERATORS = _GeneratorLock()


def module_trees(params: Sequence[Tensor]) -> list[torch.nn.Module]:
    """Every module of the module trees that hold one of ``params``: the modules that
    own one, all their ancestors, and everything below the topmost ones.

    Parameters know nothing of their modules, so this scans the live nn.Module
    objects once (0.08 s among 350k live objects, measured); callers cache it.
    """
    ids = {id(p) for p in params}
    owners: list = []
    parents: dict = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.nn.Module):
            continue
        own = getattr(obj, "_parameters", None)
        children = getattr(obj, "_modules", None)
        if own and any(id(p) in ids for p in own.values()):
            owners.append(obj)
        if children:
            for child in children.values():
                if child is not None:
                    parents.setdefault(id(child), []).append(obj)
    roots, seen, todo = [], set(), owners
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        up = parents.get(id(m))
        if up:
            todo.extend(up)
        else:
            roots.append(m)
    return _below(roots)


def _below(roots: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """Every module of the trees under ``roots``, each once, roots first."""
    out, seen = [], set()
    for root in roots:
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


class ModuleTrees:
    """:func:`module_trees`, cached per parameter set (the roots are kept weakly and
    walked again on each call, so modules added below them are seen)."""

    def __init__(self):
        self._key: tuple | None = None
        self._roots: list = []

    def __call__(self, params: Sequence[Tensor]) -> list[torch.nn.Module]:
        key = tuple(map(id, params))
        roots = [r() for r in self._roots]
        if key != self._key or any(r is None for r in roots):
            modules = module_trees(params)
            below = {id(c) for m in modules for c in m.children()}
            roots = [m for m in modules if id(m) not in below]
            self._key, self._roots = key, [weakref.ref(r) for r in roots]
            return modules
        return _below(roots)

    def __getstate__(self) -> dict:  # copies find their own modules again
        return {"_key": None, "_roots": []}


def _inference(t: Tensor) -> bool:
    try:
        return t.is_inference()
    except (AttributeError, RuntimeError):
        return False


class BufferGuard:
    """Puts back every buffer of ``modules`` that changes inside the guard.

    The probe's forward pass would otherwise move BatchNorm running statistics (and
    any other buffer) a second time.  Entering copies the buffers; leaving copies
    them all back (version counters cannot tell: eager BatchNorm updates its running
    statistics without bumping them) and puts back a buffer that was replaced.
    Nothing is installed anywhere, so other threads and torch.compile see nothing.
    """

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.modules = list(modules)
        self.saved: list = []

    def snapshot(self) -> None:
        copies: dict[int, Tensor] = {}  # a buffer shared by two modules is copied once
        saved = []
        with torch.no_grad():
            for module in self.modules:
                for name, buf in module._buffers.items():
                    if buf is None:
                        continue
                    if _inference(buf):
                        continue  # cannot be changed in place outside inference mode
                    if id(buf) not in copies:
                        copies[id(buf)] = buf.detach().clone()
                    saved.append((module, name, buf, copies[id(buf)]))
        self.saved = saved

    def restore(self) -> None:
        done = set()
        with torch.no_grad():
            for module, name, original, value in self.saved:
                if module._buffers.get(name) is not original:
                    module._buffers[name] = original  # undo a replacement
                if id(original) not in done:
                    done.add(id(original))
                    original.copy_(value)

    def __enter__(self) -> BufferGuard:
        self.snapshot()
        return self

    def __exit__(self, *exc) -> Literal[False]:
        self.restore()
        return False


__all__ = ["GENERATORS", "BufferGuard", "ModuleTrees", "RngSnapshot", "drain_at_exit", "in_process_group",
           "is_distributed", "module_trees"]
