"""Per-call time of every mtlopt aggregator, next to numpy's floor and TorchJD's aggregators.

Every method is timed as ``jax.jit(tx.update, donate_argnums=1)`` on one float32 ``(T, P)``
task-grads array, the returned state fed back each call (so CAGrad's and MGDA's warm start and
DB-MTL's EMA run as in training), with ``block_until_ready``; the median of the timed calls
after a warm-up is reported. All functions of one table are timed round-robin (one call of each
per round), so a load spike from another process hits them all alike and the ratios hold.

    python benchmarks/aggregation.py            # T=10, P=1e6: the table and the targets
    python benchmarks/aggregation.py --quick    # T=10, P=1e5, few repeats (CI, seconds)
    python benchmarks/aggregation.py --sweep    # T x P sweep -> benchmarks/results/

See benchmarks/README.md for the columns, the targets and how to get a fair numpy floor.
Issue 12's methods (the Gramian family, ``ISSUE12``) get a row each once mtlopt has them, with
their TorchJD counterparts (UPGrad and DualProj need ``qpsolvers`` and ``quadprog``, NashMTL
``cvxpy`` and ``ecos``; without them the peer column says n/a) and two more targets: at least
2x faster than TorchJD (5x for Nash-MTL) and compiled in under 2 s.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:  # run from a checkout without `pip install -e .`
    import mtlopt
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mtlopt

import jax
import jax.numpy as jnp

W = 34  # width of the table's first column
RESULTS = Path(__file__).resolve().parent / "results"
SWEEP_METHODS = ("mean", "cagrad", "mgda", "db_mtl", "pcgrad")
SWEEP_T = (2, 10, 40)
SWEEP_P = (100_000, 1_000_000, 10_000_000)

# The issues' targets, as (reference, factor): time(method) <= factor * time(reference).
GRAM_TARGET = ("gramian+mean", 1.3)
COORD_TARGET = ("mean", 4.0)
TARGETS = {
    "cagrad": GRAM_TARGET,
    "cagrad_warm": GRAM_TARGET,
    "mgda": GRAM_TARGET,
    "mgda_warm": GRAM_TARGET,
    # "pcgrad works on the Gramian": T^2 passes over the grads would cost ~T times more.
    "pcgrad": GRAM_TARGET,
    "db_mtl": ("mean", 4.0),
}
# Methods with a small problem to solve: their solve column (see gram_factor).
SOLVED = ("cagrad", "cagrad_warm", "mgda", "mgda_warm", "pcgrad")
# Issue 12 (the Gramian family): every Gramian method within GRAM_TARGET, the per-coordinate
# ones (graddrop, trimmed_mean) within COORD_TARGET; each at least PEER_TARGET times faster
# than its TorchJD counterpart (NASH_PEER_TARGET for Nash-MTL, which TorchJD solves on the
# host with cvxpy); compiled in under COMPILE_TARGET seconds at T = 10.
PEER_TARGET = 2.0
NASH_PEER_TARGET = 5.0
COMPILE_TARGET = 2.0
# Issue 15 (stateful and stochastic methods): the Gramian ones within GRAM_TARGET; the
# double-sample ones (second_sample=: one cross-Gramian pass reads both samples) within 1.3x
# their two Gramian passes + mean(); those with a T x P state within 5x mean(); each at least
# PEER_TARGET times faster than TorchJD's counterpart where there is one. The periodic
# refresh (every K_REFRESH steps) is timed over K_REFRESH consecutive calls (all phases) and
# judged against mean() + (its method's time - mean()) / K_REFRESH, times 1.3.
CROSS_TARGET = ("2 gramians+mean", 1.3)
STATE_TARGET = ("mean", 5.0)
K_REFRESH = 10
FAMILY_TARGETS = {
    "gramian": GRAM_TARGET,
    "coordinate": COORD_TARGET,
    "cross": CROSS_TARGET,
    "state": STATE_TARGET,
}


# --------------------------------------------------------------------------------------------
# Data


def make_task_grads(T: int, P: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float32 ``(T, P)`` array of task gradients and ``(T,)`` positive losses.

    Task t is ``s_t * (a_t * u + n_t)``: a shared direction u (some tasks against it, a_t < 0),
    its own noise n_t, and a scale s_t spread over two decades, so the Gramian is ill-conditioned
    and the solvers have real work to do (random Gaussian rows alone are nearly orthogonal).
    """
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((T, P), dtype=np.float32)
    u = rng.standard_normal(P, dtype=np.float32)
    a = rng.uniform(-0.5, 1.5, T).astype(np.float32)
    s = np.exp(rng.uniform(np.log(0.1), np.log(10.0), T)).astype(np.float32)
    for t in range(T):  # in place, row by row: no second T x P temporary
        J[t] += a[t] * u
        J[t] *= s[t] / np.sqrt(P, dtype=np.float32)
    losses = rng.uniform(0.5, 2.0, T).astype(np.float32)
    return J, losses


# --------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Bench:
    """One timed function; ``call`` runs it once and blocks until its result is ready."""

    name: str
    call: Callable[[], Any]
    after: Callable[[], None] | None = None  # untimed bookkeeping after each timed call
    times: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    steps: int = 1  # updates per call: ms is per update

    @property
    def ms(self) -> float:
        return 1e3 * statistics.median(self.times) / self.steps if self.times else float("nan")


def run_round_robin(
    benches: list[Bench], repeats: int, warmup: int = 2, budget_s: float | None = None
) -> None:
    """Warm-up calls, then ``repeats`` rounds of one timed call of each bench.

    Each round calls the benches in a new (seeded) random order, so no bench always follows the
    same one: a cyclic rotation would keep each bench's predecessor, and a bench that follows
    one that writes a fresh T x P output (log_transform) was measured 30-50% slower for it.

    With ``budget_s``, the number of rounds is cut so that the rounds take about that long
    (at least 3), judged from the last warm-up round.
    """
    round_s = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        for b in benches:
            b.call()
        round_s = time.perf_counter() - start
    if budget_s is not None and round_s > 0:
        repeats = max(3, min(repeats, int(budget_s / round_s)))
    order = random.Random(0)
    for _ in range(repeats):
        for b in order.sample(benches, len(benches)):  # no fixed order, no fixed neighbour
            start = time.perf_counter()
            b.call()
            b.times.append(time.perf_counter() - start)
            if b.after is not None:
                b.after()


def run_groups(groups: list[list[Bench]], repeats: int, warmup: int = 2, budget_s=None) -> None:
    """Each group round-robin (see :func:`run_round_robin`), the groups one after the other.

    One group per library (JAX, numpy, torch): interleaving libraries call by call makes each
    pay for waking its own thread pool after another's (10x on a tiny numpy call here).
    """
    for group in groups:
        if group:
            run_round_robin(group, repeats, warmup, budget_s and budget_s / len(groups))


def _compile(fn: Callable, args: tuple, kwargs: dict, donate: tuple = ()):
    """``jax.jit(fn).lower(...).compile()``, its wall time and peak temporary bytes."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - start
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # not every backend or version reports it
        temp = None
    return compiled, seconds, temp


@dataclasses.dataclass(frozen=True)
class Spec:
    """An mtlopt method as benchmarked: the row name and how to build the transformation."""

    name: str
    label: str
    make: Callable[[int], Any]  # T -> optax transformation
    peer: str | None  # the TorchJD aggregator of the same name (None: TorchJD has none)
    warm: bool = False  # built with num_tasks: report the solver's mean iterations
    # Issue 12's rows: "gramian" or "coordinate" (which time target), with the TorchJD and
    # compile-time targets; None for the rows before it (their time target is in TARGETS).
    # Issue 15's: "gramian", "cross", "state" or "refresh" (FAMILY_TARGETS, K_REFRESH).
    family: str | None = None
    second_sample: bool = False  # passes second_sample= (another sample of the task grads)
    issue: int = 12


# Issue 12's methods as (mtlopt name, row name, label, T -> transformation, TorchJD peer,
# warm, family), each with TorchJD's defaults (and its required counts: Krum's n_byzantine=1,
# TrimmedMean's trim_number=1, NashMTL's n_tasks=T). A row appears once mtlopt has the
# method, so the table follows the methods as they land.
ISSUE12 = [
    ("upgrad", "upgrad", "upgrad()", lambda T: mtlopt.upgrad(), "UPGrad", False, "gramian"),
    ("upgrad", "upgrad_warm", "upgrad(num_tasks=T)", lambda T: mtlopt.upgrad(num_tasks=T),
     "UPGrad", True, "gramian"),
    ("dualproj", "dualproj", "dualproj()", lambda T: mtlopt.dualproj(), "DualProj", False,
     "gramian"),
    ("dualproj", "dualproj_warm", "dualproj(num_tasks=T)",
     lambda T: mtlopt.dualproj(num_tasks=T), "DualProj", True, "gramian"),
    ("imtl_g", "imtl_g", "imtl_g()", lambda T: mtlopt.imtl_g(), "IMTLG", False, "gramian"),
    ("nash_mtl", "nash_mtl", "nash_mtl(num_tasks=T)", lambda T: mtlopt.nash_mtl(num_tasks=T),
     "NashMTL", True, "gramian"),
    ("aligned_mtl", "aligned_mtl", "aligned_mtl()", lambda T: mtlopt.aligned_mtl(),
     "AlignedMTL", False, "gramian"),
    ("config", "config", "config()", lambda T: mtlopt.config(), "ConFIG", False, "gramian"),
    ("gradvac", "gradvac", "gradvac(num_tasks=T)",
     lambda T: mtlopt.gradvac(beta=0.5, num_tasks=T), "GradVac", False, "gramian"),
    ("krum", "krum", "krum(1)", lambda T: mtlopt.krum(n_byzantine=1), "Krum", False, "gramian"),
    ("ntkmtl", "ntkmtl", "ntkmtl()", lambda T: mtlopt.ntkmtl(), None, False, "gramian"),
    ("graddrop", "graddrop", "graddrop()", lambda T: mtlopt.graddrop(leak=0.0, seed=0),
     "GradDrop", False, "coordinate"),
    ("trimmed_mean", "trimmed_mean", "trimmed_mean(1)",
     lambda T: mtlopt.trimmed_mean(trim_number=1), "TrimmedMean", False, "coordinate"),
]  # fmt: skip


# Issue 15's methods, as ISSUE12 (TorchJD's defaults where it has the method; FairGrad's alpha
# has no default there: 1.0, mtlopt's). SDMGrad and MoDo get a second sample, and their
# TorchJD weightings its cross-Gramian J1 J2^T (computed by torch in the timed call).
ISSUE15 = [
    ("fairgrad", "fairgrad", "fairgrad(num_tasks=T)", lambda T: mtlopt.fairgrad(num_tasks=T),
     "FairGrad", True, "gramian"),
    ("pcd", "pcd", "pcd(num_tasks=T)", lambda T: mtlopt.pcd(num_tasks=T), "PCD", False,
     "gramian"),
    ("sdmgrad", "sdmgrad", "sdmgrad(T) + second_sample",
     lambda T: mtlopt.sdmgrad(num_tasks=T), "SDMGradWeighting", False, "cross"),
    ("modo", "modo", "modo(T) + second_sample", lambda T: mtlopt.modo(num_tasks=T),
     "MoDoWeighting", False, "cross"),
    ("moco", "moco", "moco(num_tasks=T)", lambda T: mtlopt.moco(num_tasks=T), None, False,
     "state"),
    ("excess_mtl", "excess_mtl", "excess_mtl(num_tasks=T)",
     lambda T: mtlopt.excess_mtl(num_tasks=T), "ExcessMTL", False, "state"),
    ("smooth_weights", "smooth_upgrad", "smooth_weights(upgrad(T))",
     lambda T: mtlopt.smooth_weights(mtlopt.upgrad(num_tasks=T)), "CRMOGM(UPGrad)", False,
     "gramian"),
    ("refresh_weights", "refresh_mgda", f"refresh_weights(mgda(T), {K_REFRESH})",
     lambda T: mtlopt.refresh_weights(mtlopt.mgda(num_tasks=T), K_REFRESH), None, False,
     "refresh"),
]  # fmt: skip


def issue15_specs() -> list[Spec]:
    """Issue 15's rows for the methods that mtlopt has now."""
    return [
        Spec(row, label, make, peer, warm, family, family == "cross", 15)
        for method, row, label, make, peer, warm, family in ISSUE15
        if hasattr(mtlopt, method)
    ]


def issue12_specs() -> list[Spec]:
    """Issue 12's rows for the methods that mtlopt has now."""
    return [
        Spec(row, label, make, peer, warm, family)
        for method, row, label, make, peer, warm, family in ISSUE12
        if hasattr(mtlopt, method)
    ]


def specs(T: int) -> list[Spec]:
    w = np.linspace(1.0, 2.0, T, dtype=np.float32) / T
    return [
        Spec("mean", "mean()", lambda T: mtlopt.mean(), "Mean"),
        Spec("linear", "linear(w)", lambda T: mtlopt.linear(w), "Constant"),
        Spec("cagrad", "cagrad()", lambda T: mtlopt.cagrad(c=0.4), "CAGrad"),
        Spec(
            "cagrad_warm",
            "cagrad(num_tasks=T)",
            lambda T: mtlopt.cagrad(c=0.4, num_tasks=T),
            "CAGrad",
            warm=True,
        ),
        Spec("mgda", "mgda()", lambda T: mtlopt.mgda(), "MGDA"),
        Spec("mgda_warm", "mgda(num_tasks=T)", lambda T: mtlopt.mgda(num_tasks=T), "MGDA", True),
        Spec("pcgrad", "pcgrad()", lambda T: mtlopt.pcgrad(seed=0), "PCGrad"),
        Spec("db_mtl", "db_mtl(T)", lambda T: mtlopt.db_mtl(T), None),
        Spec("log_transform", "log_transform()", lambda T: mtlopt.log_transform(), None),
        *issue12_specs(),
        *issue15_specs(),
    ]


def method_bench(spec: Spec, grads, params, losses, T: int, next_grads=None) -> Bench:
    """A jitted ``update`` with the state donated and fed back, plus compile time and memory.

    With ``next_grads``, calls alternate between ``grads`` and ``next_grads`` (same shapes), so
    a warm-started solver meets a Gramian that moved since its last solve, as in training.
    """
    tx = spec.make(T)
    state0 = tx.init(params)
    kwargs = {"task_losses": losses}
    if spec.second_sample:  # (the next step's grads stand in for an independent sample)
        kwargs["second_sample"] = jax.tree.map(lambda x: x * 0.9, grads)
    compiled, seconds, temp = _compile(tx.update, (grads, state0, params), kwargs, donate=(1,))
    inputs = [grads] if next_grads is None else [grads, next_grads]
    box = {"state": state0, "k": 0}

    # A periodic refresh runs a whole period per call (every phase once): ms is its mean step.
    steps = K_REFRESH if spec.family == "refresh" else 1

    def call():
        for _ in range(steps):
            g = inputs[box["k"] % len(inputs)]
            box["k"] += 1
            out, box["state"] = compiled(g, box["state"], params, **kwargs)
            jax.block_until_ready(out)

    bench = Bench(spec.name, call, info={"compile_s": seconds, "temp_bytes": temp}, steps=steps)
    if spec.warm and getattr(state0, "solver", None) is not None:
        # Solver iterations from a cold start: the same transformation fed its init state.
        cold_state = tx.init(params)
        _, cold_state = compiled(grads, cold_state, params, **kwargs)
        bench.info["cold_iters"] = int(cold_state.solver.num_steps)
        bench.info["cold_converged"] = bool(cold_state.solver.converged)
        iters: list[int] = []
        bench.info["iters"] = iters
        bench.after = lambda: iters.append(int(box["state"].solver.num_steps))
    return bench


def gram_factor(J: np.ndarray) -> np.ndarray:
    """A float32 ``(T, T)`` matrix with the Gramian of ``J`` (float64 eigh, negatives clamped).

    A Gramian method run on it solves the same small problem as on ``J`` while its two passes
    cost nothing: its time is the solver's plus the call's overhead (the solve column).
    """
    Jd = J.astype(np.float64)
    ev, V = np.linalg.eigh(Jd @ Jd.T)
    return (V * np.sqrt(np.maximum(ev, 0.0))).astype(np.float32)


def perturbed(J: np.ndarray, seed: int) -> np.ndarray:
    """``J`` with each task's row rescaled by 0.8 to 1.25: the next step's task grads."""
    s = np.exp(np.random.default_rng(seed + 1).uniform(np.log(0.8), np.log(1.25), J.shape[0]))
    return J * s.astype(np.float32)[:, None]


def jax_reference_benches(grads, T: int, P: int) -> list[Bench]:
    from mtlopt._src import native

    w = jnp.full((T,), 1.0 / T, jnp.float32)
    out = []
    cases = [("gramian", mtlopt.gramian, (grads,)), ("combine", mtlopt.combine, (w, grads))]
    if native.available():  # the pure-JAX Gramian it replaces, side by side
        cases.append(("gramian, no kernel", _pure_gramian, (grads,)))
    for name, fn, args in cases:
        compiled, seconds, temp = _compile(fn, args, {})

        def call(compiled=compiled, args=args):
            jax.block_until_ready(compiled(*args))

        out.append(Bench(name, call, info={"compile_s": seconds, "temp_bytes": temp}))
    return out


def _pure_gramian(grads):
    """mtlopt.gramian on the CPU without the native kernel (MTLOPT_NATIVE=0 does the same)."""
    from mtlopt._src import tree

    leaves = [tree.as_matrix(x) for x in jax.tree.leaves(grads)]
    return tree._cpu_gramian(leaves, None, use_native=False)


def numpy_benches(J: np.ndarray) -> list[Bench]:
    w = np.full((J.shape[0],), 1.0 / J.shape[0], np.float32)
    return [
        Bench("numpy w @ J", lambda: w @ J),
        Bench("numpy J @ J.T", lambda: J @ J.T),
    ]


def load_torch(threads: int):
    """``(torch, torchjd.aggregation)``, or ``(None, None)`` when they are not installed."""
    try:
        import torch
        import torchjd.aggregation as tjd
    except ImportError:
        return None, None
    torch.set_num_threads(threads)
    return torch, tjd


def torch_benches(torch, J: np.ndarray) -> list[Bench]:
    tJ = torch.from_numpy(J)  # shares J's memory
    tw = torch.full((J.shape[0],), 1.0 / J.shape[0], dtype=torch.float32)
    return [
        Bench("torch w @ J", lambda: tw @ tJ),
        Bench("torch J @ J.T", lambda: tJ @ tJ.T),
    ]


def make_peer(tjd, torch, name: str, T: int):
    if name in ("SDMGradWeighting", "MoDoWeighting"):  # on the cross-Gramian of two samples
        weighting = getattr(tjd, name)()

        def cross(tJ):
            tJ2 = tJ * 0.9  # (the second sample is read by the product, as mtlopt's pass)
            return weighting(tJ @ tJ2.T) @ tJ

        return cross
    if name == "CRMOGM(UPGrad)":
        return tjd.GramianWeightedAggregator(tjd.CRMOGMWeighting(tjd.UPGradWeighting()))
    if name == "FairGrad":
        return tjd.FairGrad(alpha=1.0)
    if name == "Constant":
        return tjd.Constant(torch.linspace(1.0, 2.0, T) / T)
    if name == "CAGrad":
        return tjd.CAGrad(c=0.4)
    if name == "NashMTL":  # needs cvxpy and ecos (torchjd[nash_mtl])
        return tjd.NashMTL(n_tasks=T)
    if name == "Krum":
        return tjd.Krum(n_byzantine=1)
    if name == "TrimmedMean":
        return tjd.TrimmedMean(trim_number=1)
    return getattr(tjd, name)()


def torchjd_benches(torch, tjd, J: np.ndarray, names: list[str]) -> list[Bench]:
    tJ = torch.from_numpy(J)
    out = []
    for name in dict.fromkeys(names):  # each aggregator once, in order
        try:
            agg = make_peer(tjd, torch, name, J.shape[0])
            with torch.no_grad():  # a first call: optional solvers are imported only here
                agg(tJ)
        except Exception as e:  # e.g. CAGrad or NashMTL without their optional solvers
            print(f"  TorchJD {name}: unavailable ({type(e).__name__}: {e})", file=sys.stderr)
            continue

        def call(agg=agg):
            with torch.no_grad():
                agg(tJ)

        out.append(Bench(f"TorchJD {name}", call))
    return out


# --------------------------------------------------------------------------------------------
# The table


def _fmt(x: float | None, spec: str = ".2f", na: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return na
    return format(x, spec)


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where Linux reports them (the
    same name covers CPUs whose matmul kernels differ by 3x: see mtlopt/_src/tree.py)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in f) if v)
    except OSError:
        return name
    name = info.get("model name", name)
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


# glibc's malloc hands blocks above its mmap threshold (dynamic, at most 32 MiB) back to the
# kernel when they are freed, and trims the top of its heap, so a program that allocates the same
# large buffers every call (XLA:CPU's temporaries, torch's Jacobians) page-faults on fresh zeroed
# pages every call. Measured here (1e6-parameter MLP, T = 10): the T task gradients alone
# 72 -> 61 ms, a whole mean() step 94 -> 71 ms (JAX); TorchJD's Mean step 119 -> 98 ms. "retain"
# keeps freed memory in the process, as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> (or
# tcmalloc, jemalloc) would; it applies to both libraries of a run alike.
MALLOC_MODES = ("glibc", "retain")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def set_malloc(mode: str) -> str:
    """Sets the allocator policy for this process (``"glibc"``: left as it is); describes it."""
    if mode == "glibc":
        return "glibc malloc defaults"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        raise SystemExit("--malloc retain needs glibc's mallopt (Linux)")
    return "glibc malloc retaining freed memory (mallopt: M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)"


def one_offs(T: int) -> str:
    """What the first trace in a process pays once, done here before any compile is timed.

    mtlopt.gramian's probe of which CPU loop wins (per T), and JAX's first LU lowering on CPU,
    which imports scipy.linalg for its LAPACK kernels (0.29 s of cagrad's first compile in a
    profile). The compile column then holds only each method's own compilation.
    """
    from mtlopt._src import native, tree

    start = time.perf_counter()
    kernel = native.available(T)
    outer = tree._outer_loop_wins(T)  # (what runs without the kernel, and for bfloat16)
    probe = time.perf_counter() - start
    start = time.perf_counter()
    jax.jit(jax.scipy.linalg.lu_factor).lower(jnp.eye(2)).compile()
    lapack = time.perf_counter() - start
    loop = "outer products" if outer else "dots"
    way = f"native kernel (else loop: {loop})" if kernel else f"loop: {loop}"
    return f"CPU Gramian: {way} (check and probe {probe:.2f} s; first LU lowering {lapack:.2f} s)"


def run_table(
    T: int, P: int, repeats: int, threads: int, use_torch: bool, seed: int, solve: bool = True
) -> bool:
    """Times everything at one (T, P), prints the table, returns whether every target passed.

    ``solve``: also time the solve column (the Gramian methods on a ``(T, T)`` factor: one more
    compilation each; ``--quick`` leaves it out)."""
    loop = one_offs(T)
    J, losses_np = make_task_grads(T, P, seed)
    grads = {"w": jnp.asarray(J)}
    params = {"w": jnp.zeros((P,), jnp.float32)}
    losses = jnp.asarray(losses_np)
    one_copy = 4 * P

    next_grads = {"w": jnp.asarray(perturbed(J, seed))}
    all_specs, methods, broken = [], [], []
    for s in specs(T):
        try:  # a method still being written must not stop the table
            methods.append(
                method_bench(s, grads, params, losses, T, next_grads if s.warm else None)
            )
            all_specs.append(s)
        except Exception as e:
            broken.append(f"{s.label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    del next_grads
    # The same methods on a (T, T) factor with the same Gramian: the solve alone.
    factor = gram_factor(J)
    solves = {}
    for s in all_specs:
        if not solve or not (s.name in SOLVED or s.family == "gramian"):
            continue
        solves[s.name] = method_bench(
            dataclasses.replace(s, name=s.name + " solve"),
            {"w": jnp.asarray(factor)},
            {"w": jnp.zeros((T,), jnp.float32)},
            losses,
            T,
            {"w": jnp.asarray(perturbed(factor, seed))} if s.warm else None,
        )
    refs = jax_reference_benches(grads, T, P)
    floors = numpy_benches(J)
    torch, tjd = load_torch(threads) if use_torch else (None, None)
    peers: dict[str, Bench] = {}
    torch_floors: list[Bench] = []
    if torch is not None:
        torch_floors = torch_benches(torch, J)
        for b in torchjd_benches(torch, tjd, J, [s.peer for s in all_specs if s.peer]):
            peers[b.name.removeprefix("TorchJD ")] = b
    run_groups(
        [methods + list(solves.values()) + refs, floors, torch_floors + list(peers.values())],
        repeats,
    )
    floors += torch_floors

    by = {b.name: b for b in methods + refs}
    ref_ms = {"mean": by["mean"].ms, "gramian+mean": by["gramian"].ms + by["mean"].ms}
    ref_ms["2 gramians+mean"] = 2 * by["gramian"].ms + by["mean"].ms
    if "mgda_warm" in by:  # what the refresh would cost: mean() + the rest of MGDA, once a period
        ref_ms["refresh"] = by["mean"].ms + (by["mgda_warm"].ms - by["mean"].ms) / K_REFRESH

    print(
        f"\nmtlopt {mtlopt.__version__}, jax {jax.__version__} ({jax.default_backend()}), "
        f"float32 task grads T={T}, P={P:.0e} ({T * P * 4 / 2**20:.0f} MiB), "
        f"median of {len(methods[0].times)} calls, {threads} threads, {cpu_name()}"
        + (f", torch {torch.__version__}" if torch is not None else ", TorchJD: not installed")
        + f"; {loop}"
    )
    ctag = f"<{COMPILE_TARGET:g}s"
    head = (
        f"{'method':<{W}}{'ms':>9}{'x mean':>8}{'x(G+m)':>8}  {'target':<14}{'result':<7}"
        f"{'compile s':>10}{ctag:>6}{'temp xP':>9}{'iters':>11}{'solve %':>9}{'TorchJD ms':>12}"
        f"{'speed-up':>10}  {'vs TorchJD':<11}{'result':<6}"
    )
    print(head)
    print("-" * len(head))
    ok, unconverged, failed = True, False, []

    def judge(passed: bool, what: str) -> str:
        nonlocal ok
        ok &= passed
        if not passed:
            failed.append(what)
        return "PASS" if passed else "FAIL"

    for spec, b in zip(all_specs, methods, strict=True):
        target, result = "", ""
        time_target = TARGETS.get(spec.name)
        if spec.family is not None:
            time_target = FAMILY_TARGETS.get(spec.family)
        if spec.family == "refresh" and "refresh" in ref_ms:
            time_target = ("refresh", 1.3)
        if time_target is not None:
            ref, factor = time_target
            short = {"mean": "mean", "gramian+mean": "G+m", "2 gramians+mean": "2G+m"}
            target = f"<={factor:g}x {short.get(ref, 'm+M/k')}"
            result = judge(b.ms <= factor * ref_ms[ref], f"{spec.label} time")
        iters = ""
        if "cold_iters" in b.info:
            iters = f"{np.mean(b.info['iters']):.1f}/{b.info['cold_iters']}"
            if not b.info["cold_converged"]:
                iters += "*"
                unconverged = True
        peer = peers.get(spec.peer) if spec.peer else None
        peer_ms = peer.ms if peer is not None else None
        speedup = peer_ms / b.ms if peer_ms is not None else None
        temp = b.info["temp_bytes"]
        solve = f"{100 * solves[spec.name].ms / b.ms:.0f}" if spec.name in solves else ""
        compiled_in, peer_target, peer_result = "", "", ""
        if spec.family is not None and spec.issue == 12:
            compiled_in = judge(b.info["compile_s"] < COMPILE_TARGET, f"{spec.label} compile")
        if spec.family is not None and spec.peer:
            need = NASH_PEER_TARGET if spec.peer == "NashMTL" else PEER_TARGET
            peer_target = f">={need:g}x"
            peer_result = (
                "n/a" if speedup is None else judge(speedup >= need, f"{spec.label} vs TorchJD")
            )
        print(
            f"{spec.label:<{W}}{b.ms:>9.2f}{b.ms / ref_ms['mean']:>8.2f}"
            f"{b.ms / ref_ms['gramian+mean']:>8.2f}  {target:<14}{result:<7}"
            f"{b.info['compile_s']:>10.2f}{compiled_in:>6}"
            f"{_fmt(temp and temp / one_copy, '.2f'):>9}"
            f"{iters:>11}{solve:>9}{_fmt(peer_ms):>12}"
            f"{_fmt(speedup, '.1f') + ('x' if speedup else ''):>10}  "
            f"{peer_target:<11}{peer_result:<6}"
        )
    print("-" * len(head))
    for b in refs:
        temp = b.info["temp_bytes"]
        args = "(w, grads)" if b.name == "combine" else "(grads)"
        label = "mtlopt." + b.name.replace(",", args + ",") + ("" if "," in b.name else args)
        print(
            f"{label:<{W}}{b.ms:>9.2f}{b.ms / ref_ms['mean']:>8.2f}"
            f"{b.ms / ref_ms['gramian+mean']:>8.2f}  {'':<14}{'':<7}"
            f"{b.info['compile_s']:>10.2f}{_fmt(temp and temp / one_copy, '.2f'):>9}"
        )
    print(f"{'gramian + mean()':<{W}}{ref_ms['gramian+mean']:>9.2f}")
    for b in floors:
        print(f"{b.name:<{W}}{b.ms:>9.2f}{b.ms / ref_ms['mean']:>8.2f}")
    if torch is None:
        print("TorchJD / torch: n/a (pip install -e '.[bench]' for the peer column)")
    print(
        "x(G+m): time / (mtlopt.gramian + mean()); temp xP: compiled temporary buffers / (P * 4 "
        "bytes); iters: solver steps, warm mean / cold; solve %: the same method on a (T, T) "
        "matrix with the same Gramian (the solve and the call's overhead) / ms; speed-up: "
        "TorchJD ms / mtlopt ms."
    )
    if unconverged:
        print("*: the cold solve stopped at max_iters without reaching its tolerance.")
    print(
        f"issue 12 rows: time target by family (Gramian <={GRAM_TARGET[1]:g}x G+m, per-coordinate"
        f" <={COORD_TARGET[1]:g}x mean), compiled in {ctag}, and >={PEER_TARGET:g}x faster than "
        f"TorchJD (>={NASH_PEER_TARGET:g}x for nash_mtl)."
    )
    print(
        f"issue 15 rows: Gramian <={GRAM_TARGET[1]:g}x G+m, double-sample <={CROSS_TARGET[1]:g}x "
        f"2G+m (two Gramian passes + mean), T x P state <={STATE_TARGET[1]:g}x mean, and "
        f">={PEER_TARGET:g}x faster than TorchJD; refresh_weights: the mean step over "
        f"{K_REFRESH} calls (one period) <=1.3x m+M/k = mean + (mgda(num_tasks=T) - mean) / "
        f"{K_REFRESH}."
    )
    missing = [label for method, _, label, *_ in ISSUE12 + ISSUE15 if not hasattr(mtlopt, method)]
    if missing:
        print(f"not in mtlopt yet: {', '.join(missing)}")
    for line in broken:
        print(f"not benchmarked: {line}")
    print(f"targets: {'all PASS' if ok else 'some FAIL: ' + ', '.join(failed)}")
    return ok


# --------------------------------------------------------------------------------------------
# The sweep


def floor_ms(method: str, numpy_ms: dict) -> float:
    """numpy's floor for a method: the BLAS calls it cannot avoid."""
    if method in ("mean", "db_mtl"):
        return numpy_ms["numpy w @ J"]
    return numpy_ms["numpy w @ J"] + numpy_ms["numpy J @ J.T"]


def run_sweep(Ts, Ps, repeats, threads, use_torch, seed, budget_s, out_dir: Path) -> list[dict]:
    torch, tjd = load_torch(threads) if use_torch else (None, None)
    peer_of = {s.name: s.peer for s in specs(2)}
    spec_of = {s.name: s for s in specs(2)}
    rows = []
    for T in Ts:
        for P in Ps:
            start = time.perf_counter()
            print(f"T={T}: {one_offs(T)}", flush=True)
            J, losses_np = make_task_grads(T, P, seed)
            grads = {"w": jnp.asarray(J)}
            params = {"w": jnp.zeros((P,), jnp.float32)}
            losses = jnp.asarray(losses_np)
            methods = [method_bench(spec_of[m], grads, params, losses, T) for m in SWEEP_METHODS]
            floors = numpy_benches(J)
            peers: dict[str, Bench] = {}
            if torch is not None:
                names = [peer_of[m] for m in SWEEP_METHODS if peer_of[m]]
                peers = {
                    b.name.removeprefix("TorchJD "): b
                    for b in torchjd_benches(torch, tjd, J, names)
                }
            run_groups([methods, floors, list(peers.values())], repeats, 1, budget_s)
            numpy_ms = {b.name: b.ms for b in floors}
            for m, b in zip(SWEEP_METHODS, methods, strict=True):
                peer = peers.get(peer_of[m]) if peer_of[m] else None
                rows.append(
                    {
                        "method": m,
                        "T": T,
                        "P": P,
                        "ms": b.ms,
                        "torchjd_ms": peer.ms if peer is not None else None,
                        "floor_ms": floor_ms(m, numpy_ms),
                    }
                )
                r = rows[-1]
                print(
                    f"T={T:<3} P={P:<9.0e} {m:<8} {r['ms']:>10.2f} ms   TorchJD "
                    f"{_fmt(r['torchjd_ms']):>9} ms   numpy floor {r['floor_ms']:>9.2f} ms",
                    flush=True,
                )
            print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
            del grads, J, methods, floors, peers
    write_sweep(rows, out_dir, torch is not None, threads)
    return rows


def write_sweep(rows: list[dict], out_dir: Path, have_torch: bool, threads: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Aggregation sweep",
        "",
        f"mtlopt {mtlopt.__version__}, jax {jax.__version__} ({jax.default_backend()}), "
        f"float32, {threads} threads, {cpu_name()}, median per-call ms. Written by "
        "`python benchmarks/aggregation.py --sweep`.",
        "",
        "numpy floor: `w @ J` (mean, db_mtl) or `J @ J.T` + `w @ J` (Gramian methods).",
        "",
        "| method | T | P | mtlopt ms | TorchJD ms | speed-up vs TorchJD | numpy floor ms "
        "| x floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tj = r["torchjd_ms"]
        lines.append(
            f"| {r['method']} | {r['T']} | {r['P']:.0e} | {r['ms']:.2f} | {_fmt(tj)} | "
            f"{_fmt(tj and tj / r['ms'], '.1f')} | {r['floor_ms']:.2f} | "
            f"{r['ms'] / r['floor_ms']:.2f} |"
        )
    if not have_torch:
        lines += ["", "TorchJD was not installed: no peer column."]
    (out_dir / "aggregation_sweep.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'aggregation_sweep.md'}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    methods = list(dict.fromkeys(r["method"] for r in rows))
    Ts = sorted({r["T"] for r in rows})
    ncols = 3
    nrows = -(-(len(methods) + 1) // ncols)  # one more panel for the legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    axes = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes, methods, strict=False):
        for i, T in enumerate(Ts):
            sel = sorted(
                (r for r in rows if r["method"] == m and r["T"] == T), key=lambda r: r["P"]
            )
            P = [r["P"] for r in sel]
            c = colors[i % len(colors)]
            ax.plot(P, [r["ms"] for r in sel], "-o", color=c, label=f"mtlopt, T={T}")
            if any(r["torchjd_ms"] is not None for r in sel):
                ax.plot(
                    P,
                    [r["torchjd_ms"] if r["torchjd_ms"] is not None else np.nan for r in sel],
                    "--s",
                    color=c,
                    label=f"TorchJD, T={T}",
                )
            ax.plot(P, [r["floor_ms"] for r in sel], ":", color=c, label=f"numpy floor, T={T}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(m if m != "db_mtl" else "db_mtl (no TorchJD peer)")
        ax.set_xlabel("P (parameters)")
        ax.set_ylabel("median ms per call")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[methods.index("mean")].get_legend_handles_labels()
    for ax in axes[len(methods) :]:
        ax.axis("off")
    axes[len(methods)].legend(handles, labels, loc="center", fontsize=9)
    fig.suptitle(
        f"float32 task grads, CPU, {threads} threads "
        "(solid: mtlopt, dashed: TorchJD, dotted: numpy floor)"
    )
    fig.tight_layout()
    fig.savefig(out_dir / "aggregation_sweep.png", dpi=110)
    print(f"wrote {out_dir / 'aggregation_sweep.png'}")


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="T=10, P=1e5, few repeats (CI)")
    mode.add_argument("--sweep", action="store_true", help="T x P sweep to benchmarks/results/")
    p.add_argument("--T", type=int, default=10, help="number of tasks (table mode)")
    p.add_argument("--P", type=float, default=1e6, help="number of parameters (table mode)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per function")
    p.add_argument("--sweep-T", type=int, nargs="+", default=list(SWEEP_T))
    p.add_argument("--sweep-P", type=float, nargs="+", default=list(SWEEP_P))
    p.add_argument("--budget", type=float, default=20.0, help="sweep: seconds per (T, P)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-torch", action="store_true", help="skip torch and TorchJD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    warnings.filterwarnings("ignore", message=".*not DPP.*")  # cvxpy, in TorchJD's NashMTL
    use_torch = not args.no_torch

    if args.sweep:
        Ps = [int(x) for x in args.sweep_P]
        run_sweep(
            args.sweep_T, Ps, args.repeats or 15, args.threads, use_torch, args.seed,
            args.budget, args.out,
        )  # fmt: skip
        return 0
    if args.quick:
        T, P, repeats = 10, 100_000, args.repeats or 5
    else:
        T, P, repeats = args.T, int(args.P), args.repeats or 21
    ok = run_table(T, P, repeats, args.threads, use_torch, args.seed, solve=not args.quick)
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
