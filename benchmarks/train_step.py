"""Steps per second of a whole multi-task training step: mtlopt (one jitted step) vs TorchJD.

One step is the forward pass, the T task gradients, the aggregation and the optimizer update.
JAX: ``mtlopt.task_value_and_grad`` then ``optax.chain(method, optax.adam(1e-3))``, all in one
``jax.jit`` with params and optimizer state donated. PyTorch: ``torchjd.autojac.mtl_backward``
on the shared features, ``jac_to_grad`` with TorchJD's aggregator of the same name, then
``torch.optim.Adam(1e-3)``. Both start from the same weights and data (numpy, fixed seed).

Cases:

* a shared-trunk MLP (Linear-ReLU-Linear-ReLU) with T=10 linear regression heads, batch 256,
  at about 1e6 and 1e7 parameters; the heads are task-specific (mtlopt's ``task_specific=``,
  TorchJD's ``tasks_params``): they follow their own task's gradient and stay out of the
  aggregation, which acts on the trunk;
* the small case that the JAX port JaxJD published: Linear(10,5)-ReLU-Linear(5,2), batch 16,
  two MSE losses (one per output), SGD lr 0.1, every parameter in the Jacobian
  (``torchjd.autojac.backward``), every mtlopt method against TorchJD's counterpart.

Medians of per-step times after warm-up steps, each JAX step ending in ``block_until_ready``.
Within a library each bench runs a few consecutive steps in turn, in an order drawn afresh each
turn; the libraries take turns, never call by call (see :func:`run_alternating`). Only the
ratios of one run mean much on a shared machine; each table notes the load average.

    python benchmarks/train_step.py            # all cases, writes results/train_step.md
    python benchmarks/train_step.py --quick    # tiny sizes, few steps (CI, seconds)

See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import random
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
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import MALLOC_MODES, Bench, cpu_name, set_malloc  # shared with aggregation.py

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.md"
RESULTS_RETAIN = RESULTS.with_name("train_step_retain.md")  # with --malloc retain
WARMUP = 2


# --------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One model: a shared trunk with T heads (``tiny=False``) or JaxJD's 10-5-2 MLP."""

    key: str
    d_in: int
    hidden: int
    tasks: int
    batch: int
    steps: int  # timed steps per bench (full mode)
    block: int  # rounds one library runs before the other takes over (see run_alternating)
    methods: tuple[str, ...]
    tiny: bool = False  # JaxJD's model: no heads, SGD, no aggregation-alone benches

    @property
    def num_params(self) -> int:
        d, h, t = self.d_in, self.hidden, self.tasks
        if self.tiny:
            return d * h + h + h * t + t
        return d * h + h + h * h + h + h * t + t

    @property
    def title(self) -> str:
        if self.tiny:
            return (
                f"JaxJD's case: Linear({self.d_in},{self.hidden})-ReLU-Linear({self.hidden},"
                f"{self.tasks}), {self.num_params} parameters, batch {self.batch}, "
                f"{self.tasks} MSE losses (one per output), SGD lr 0.1, all parameters in the "
                "Jacobian"
            )
        return (
            f"Shared-trunk MLP, {self.num_params:.2e} parameters (input {self.d_in}, trunk "
            f"Linear-ReLU-Linear-ReLU of width {self.hidden}, {self.tasks} linear heads), "
            f"batch {self.batch}, MSE, Adam 1e-3"
        )


TRUNK_METHODS = ("mean", "mgda", "cagrad", "pcgrad", "db_mtl")
TINY_METHODS = ("mean", "linear", "cagrad", "mgda", "pcgrad", "db_mtl")
CASES = {
    "1e6": Case("1e6", 256, 896, 10, batch=256, steps=30, block=3, methods=TRUNK_METHODS),
    "1e7": Case("1e7", 512, 2900, 10, batch=256, steps=5, block=1, methods=TRUNK_METHODS),
    "jaxjd": Case("jaxjd", 10, 5, 2, 16, steps=300, block=50, methods=TINY_METHODS, tiny=True),
}
# CI: compiling one step takes 0.5 to 3.5 s here (the solvers' loops most), so the quick
# trunk case compiles mean() alone; the JaxJD case has every method.
QUICK_CASES = {
    "quick": Case("quick", 32, 64, 10, batch=32, steps=4, block=4, methods=("mean",)),
    "jaxjd": Case("jaxjd", 10, 5, 2, 16, steps=10, block=10, methods=TINY_METHODS, tiny=True),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """An mtlopt method and its TorchJD counterpart (``peer`` None: TorchJD has none)."""

    name: str
    make: Callable[[int, Any], Any]  # (T, task_specific) -> optax transformation
    peer: str | None


def linear_weights(T: int) -> np.ndarray:
    return np.linspace(1.0, 2.0, T, dtype=np.float32) / T


# Every method built with num_tasks, as in training: the solvers warm-start from the last step.
METHODS = {
    "mean": Method("mean", lambda T, ts: mtlopt.mean(num_tasks=T, task_specific=ts), "Mean"),
    "linear": Method(
        "linear",
        lambda T, ts: mtlopt.linear(linear_weights(T), task_specific=ts),
        "Constant",
    ),
    "cagrad": Method(
        "cagrad",
        lambda T, ts: mtlopt.cagrad(c=0.4, num_tasks=T, task_specific=ts),
        "CAGrad",
    ),
    "mgda": Method("mgda", lambda T, ts: mtlopt.mgda(num_tasks=T, task_specific=ts), "MGDA"),
    "pcgrad": Method(
        "pcgrad", lambda T, ts: mtlopt.pcgrad(seed=0, num_tasks=T, task_specific=ts), "PCGrad"
    ),
    "db_mtl": Method("db_mtl", lambda T, ts: mtlopt.db_mtl(T, task_specific=ts), None),
}


# --------------------------------------------------------------------------------------------
# Data and initial weights (numpy, generated once, shared by both libraries)


def _uniform_linear(rng, fan_in: int, shape) -> np.ndarray:
    """torch.nn.Linear's default range, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def make_problem(case: Case, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """``(params, x, y)``: numpy weights, inputs and ``(B, T)`` targets.

    Weights are stored ``(out, in)`` as torch stores them, the layer is ``x @ w.T + b``: with
    this layout XLA's per-task weight gradients need no transpose (measured here: the task
    gradients of the 1e6 model took 27% less time than with ``(in, out)`` and ``x @ w``).
    """
    rng = np.random.default_rng(seed)
    d, h, T, B = case.d_in, case.hidden, case.tasks, case.batch
    x = rng.standard_normal((B, d), dtype=np.float32)
    if case.tiny:  # as JaxJD: standard normal targets
        y = rng.standard_normal((B, T), dtype=np.float32)
        params = {
            "w1": _uniform_linear(rng, d, (h, d)),
            "b1": _uniform_linear(rng, d, (h,)),
            "w2": _uniform_linear(rng, h, (T, h)),
            "b2": _uniform_linear(rng, h, (T,)),
        }
        return params, x, y
    # A random teacher; task scales over a decade, so the tasks' losses and gradients differ.
    A = rng.standard_normal((d, 16), dtype=np.float32) / np.sqrt(d, dtype=np.float32)
    C = rng.standard_normal((16, T), dtype=np.float32)
    scale = np.exp(rng.uniform(np.log(0.3), np.log(3.0), T)).astype(np.float32)
    y = (np.tanh(x @ A) @ C) * scale + 0.1 * rng.standard_normal((B, T), dtype=np.float32)
    params = {
        "trunk": {
            "w1": _uniform_linear(rng, d, (h, d)),
            "b1": _uniform_linear(rng, d, (h,)),
            "w2": _uniform_linear(rng, h, (h, h)),
            "b2": _uniform_linear(rng, h, (h,)),
        },
        "heads": {"w": _uniform_linear(rng, h, (T, h)), "b": _uniform_linear(rng, h, (T,))},
    }
    return params, x, y.astype(np.float32)


# --------------------------------------------------------------------------------------------
# JAX


def tiny_losses(p, x, y):
    h = jax.nn.relu(x @ p["w1"].T + p["b1"][None])
    out = h @ p["w2"].T + p["b2"][None]
    return jnp.mean((out - y) ** 2, axis=0)


def trunk_losses(p, x, y):
    t = p["trunk"]
    h = jax.nn.relu(x @ t["w1"].T + t["b1"][None])
    h = jax.nn.relu(h @ t["w2"].T + t["b2"][None])
    pred = h @ p["heads"]["w"].T + p["heads"]["b"][None]  # (B, T): head t predicts task t
    return jnp.mean((pred - y) ** 2, axis=0)


def _fresh(tree):
    """Device copies (the step donates them, so every bench needs its own)."""
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def jax_benches(case: Case, methods, params_np, x_np, y_np) -> tuple[list[Bench], dict]:
    """The jitted steps, the task-grads-only reference and each aggregation alone."""
    T = case.tasks
    loss_fn = tiny_losses if case.tiny else trunk_losses
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    task_specific = None
    if not case.tiny:
        task_specific = {
            "trunk": dict.fromkeys(params_np["trunk"], False),
            "heads": dict.fromkeys(params_np["heads"], True),
        }
    grad_fn = mtlopt.task_value_and_grad(loss_fn)
    opt = optax.sgd(0.1) if case.tiny else optax.adam(1e-3)

    steps, aggs = [], []
    for m in methods:
        method = METHODS[m].make(T, task_specific)
        tx = optax.chain(method, opt)

        def step(params, state, x, y, tx=tx):
            losses, task_grads = grad_fn(params, x, y)
            updates, state = tx.update(task_grads, state, params, task_losses=losses)
            return optax.apply_updates(params, updates), state, losses

        params = _fresh(params_np)
        state = tx.init(params)
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x, y).compile()
        compile_s = time.perf_counter() - start
        box = {"p": params, "s": state, "l": None}

        def call(compiled=compiled, box=box):
            box["p"], box["s"], box["l"] = compiled(box["p"], box["s"], x, y)
            jax.block_until_ready((box["p"], box["s"], box["l"]))

        steps.append(Bench(m, call, info={"compile_s": compile_s, "box": box}))

    # The task gradients alone (forward + T backward passes), and on them each aggregation
    # alone: the method's jitted update (no optimizer), its state donated and fed back. Not in
    # JaxJD's case, where the step is dispatch overhead more than work.
    params = _fresh(params_np)
    grads_compiled = jax.jit(grad_fn).lower(params, x, y).compile()
    losses, task_grads = grads_compiled(params, x, y)
    grads_only = Bench("task grads", lambda: jax.block_until_ready(grads_compiled(params, x, y)))
    for m in () if case.tiny else methods:
        method = METHODS[m].make(T, task_specific)
        state = method.init(params)
        kw = {"task_losses": losses}
        compiled = (
            jax.jit(method.update, donate_argnums=1).lower(task_grads, state, params, **kw)
        ).compile()
        box = {"s": state}

        def call(compiled=compiled, box=box, kw=kw):
            out, box["s"] = compiled(task_grads, box["s"], params, **kw)
            jax.block_until_ready(out)

        aggs.append(Bench(f"agg {m}", call))
    return [*steps, grads_only, *aggs], {"steps": steps, "grads": grads_only, "aggs": aggs}


# --------------------------------------------------------------------------------------------
# PyTorch + TorchJD


def load_torch(threads: int):
    """``(torch, torchjd.aggregation, torchjd.autojac)`` or Nones when not installed."""
    try:
        import torch
        import torchjd.aggregation as tjd
        import torchjd.autojac as autojac
    except ImportError:
        return None, None, None
    torch.set_num_threads(threads)
    return torch, tjd, autojac


def make_peer(torch, tjd, name: str, T: int):
    if name == "Constant":
        return tjd.Constant(torch.from_numpy(linear_weights(T)))
    if name == "CAGrad":
        return tjd.CAGrad(c=0.4)
    return getattr(tjd, name)()


def _linear(torch, w: np.ndarray, b: np.ndarray):
    """A torch Linear holding ``x @ w.T + b``, ``w`` of shape ``(out, in)``."""
    layer = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        layer.bias.copy_(torch.from_numpy(b))
    return layer


def torch_benches(
    torch, tjd, autojac, case: Case, methods, params_np, x_np, y_np
) -> tuple[list[Bench], dict]:
    T = case.tasks
    x, y = torch.from_numpy(x_np.copy()), torch.from_numpy(y_np.copy())
    relu = torch.nn.ReLU()

    def build():
        """``(shared params, per-task head params, model)``, with the initial weights."""
        p = params_np
        if case.tiny:
            model = torch.nn.Sequential(
                _linear(torch, p["w1"], p["b1"]), relu, _linear(torch, p["w2"], p["b2"])
            )
            return list(model.parameters()), [], model
        trunk = torch.nn.Sequential(
            _linear(torch, p["trunk"]["w1"], p["trunk"]["b1"]),
            relu,
            _linear(torch, p["trunk"]["w2"], p["trunk"]["b2"]),
            relu,
        )
        heads = [
            _linear(torch, p["heads"]["w"][t, None], p["heads"]["b"][t, None]) for t in range(T)
        ]
        return list(trunk.parameters()), [list(h.parameters()) for h in heads], (trunk, heads)

    def backward(model, shared, heads):
        """Forward and the Jacobian: the shared params' ``.jac``, the heads' ``.grad``."""
        if case.tiny:
            losses = ((model(x) - y) ** 2).mean(dim=0)
            autojac.backward(list(losses.unbind()), inputs=shared)
        else:
            trunk, head_modules = model
            features = trunk(x)
            losses = [
                ((head(features)[:, 0] - y[:, t]) ** 2).mean()
                for t, head in enumerate(head_modules)
            ]
            autojac.mtl_backward(
                losses, features=features, tasks_params=heads, shared_params=shared
            )
            losses = torch.stack(losses)
        return losses.detach()

    steps = []
    for m in methods:
        peer = METHODS[m].peer
        if peer is None:
            continue
        try:
            agg = make_peer(torch, tjd, peer, T)
        except Exception as e:  # e.g. CAGrad without its optional solver
            print(f"  TorchJD {peer}: unavailable ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        shared, heads, model = build()
        params = shared + [q for h in heads for q in h]
        opt = torch.optim.SGD(params, lr=0.1) if case.tiny else torch.optim.Adam(params, lr=1e-3)
        box = {"l": None}

        def call(model=model, shared=shared, heads=heads, agg=agg, opt=opt, box=box):
            opt.zero_grad()
            box["l"] = backward(model, shared, heads)
            autojac.jac_to_grad(shared, agg)
            opt.step()

        steps.append(Bench(m, call, info={"box": box}))

    shared, heads, model = build()

    def grads_call():
        backward(model, shared, heads)
        for p in shared:
            del p.jac
        for h in heads:
            for q in h:
                q.grad = None

    grads_only = Bench("task grads", grads_call)
    return [*steps, grads_only], {"steps": steps, "grads": grads_only}


# --------------------------------------------------------------------------------------------
# Timing


def run_alternating(
    groups: list[list[Bench]], steps: int, warmup: int, block: int, seed: int = 0
) -> None:
    """Warm-up calls, then ``steps`` timed calls of every bench, the libraries in turns.

    A library's turn is ``block`` consecutive calls of each of its benches, the benches in an
    order drawn afresh every turn: consecutive steps of one model, as a training loop makes
    them, with no bench always following the same other one. (Cycling one call of each bench
    per round, as before, timed each call right after a different program and fixed who came
    after whom: in JaxJD's sub-millisecond case that order alone moved JAX's medians by about
    1.5x.) The libraries never interleave call by call (each would pay to wake its thread pool
    after the other's), but take turns, so that both meet the same load from other processes
    over the run: a step here takes seconds, and the load on a shared machine drifts over
    minutes.
    """
    rng = random.Random(seed)
    for group in groups:
        for _ in range(warmup):
            for b in group:
                b.call()
    done = 0
    while done < steps:
        n = min(block, steps - done)
        for group in groups:
            for b in rng.sample(group, len(group)):
                for _ in range(n):
                    start = time.perf_counter()
                    b.call()
                    b.times.append(time.perf_counter() - start)
        done += n


# --------------------------------------------------------------------------------------------
# The table


def _fmt(x: float | None, spec: str = ".1f") -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return format(x, spec)


def _final_loss(bench: Bench | None) -> float | None:
    """The mean task loss of the last step (measured before its update)."""
    if bench is None or "box" not in bench.info or bench.info["box"]["l"] is None:
        return None
    return float(np.mean(np.asarray(bench.info["box"]["l"])))


def run_case(case: Case, steps: int, threads: int, torch_mods, seed: int) -> list[str]:
    """Times one case and returns its Markdown lines."""
    methods = case.methods
    params_np, x_np, y_np = make_problem(case, seed)
    start = time.perf_counter()
    jax_all, jx = jax_benches(case, methods, params_np, x_np, y_np)
    compile_s = time.perf_counter() - start
    torch, tjd, autojac = torch_mods
    torch_all, th = [], {"steps": [], "grads": None}
    if torch is not None:
        torch_all, th = torch_benches(torch, tjd, autojac, case, methods, params_np, x_np, y_np)
    load0 = os.getloadavg()[0]
    run_alternating([jax_all, torch_all], steps, WARMUP, case.block, seed)
    load1 = os.getloadavg()[0]
    total = WARMUP + steps

    peer_of = {b.name: b for b in th["steps"]}
    agg_of = {b.name.removeprefix("agg "): b for b in jx["aggs"]}
    agg_cols = not case.tiny
    head = ["method", "JAX steps/s", "TorchJD steps/s", "speed-up", "JAX ms", "TorchJD ms"]
    head += ["aggregation ms", "aggregation share"] if agg_cols else []
    head += ["loss JAX", "loss TorchJD"]
    lines = [
        f"### {case.title}",
        "",
        f"Median of {steps} steps after {WARMUP} warm-up steps; loss: the mean task loss at "
        f"step {total} (same start, same data). JAX compile time, all benches: "
        f"{compile_s:.1f} s. Load average (1 min) before / after timing: {load0:.1f} / "
        f"{load1:.1f}.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]

    def row(label, jb: Bench, tb: Bench | None, agg: Bench | None):
        t_ms = tb.ms if tb is not None else None
        speed = t_ms / jb.ms if t_ms is not None else None
        cells = [
            label,
            _fmt(1e3 / jb.ms),
            _fmt(t_ms and 1e3 / t_ms),
            _fmt(speed, ".2f") + ("x" if speed else ""),
            _fmt(jb.ms, ".3f"),
            _fmt(t_ms, ".3f"),
        ]
        if agg_cols:
            share = agg.ms / jb.ms if agg is not None else None
            cells += [
                _fmt(agg and agg.ms, ".3f"),
                _fmt(share and 100 * share, ".0f") + ("%" if share is not None else ""),
            ]
        cells += [_fmt(_final_loss(jb), ".4f"), _fmt(_final_loss(tb), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")

    for b in jx["steps"]:
        row(b.name, b, peer_of.get(b.name), agg_of.get(b.name))
    row("task grads only", jx["grads"], th["grads"], None)
    return lines


def environment(threads: int, torch_mods, allocator: str) -> str:
    torch = torch_mods[0]
    if torch is not None:
        tv = f"torch {torch.__version__}, torchjd {importlib.metadata.version('torchjd')}"
    else:
        tv = "torch / TorchJD: not run (n/a)"
    cpu = cpu_name()
    return (
        f"mtlopt {mtlopt.__version__}, jax {jax.__version__} ({jax.default_backend()}), "
        f"optax {optax.__version__}, {tv}; {threads} threads (torch.set_num_threads; XLA uses "
        f"its default pool), {cpu}, float32; {allocator}."
    )


NOTES = """\
Columns: steps/s = 1000 / the median step in ms; speed-up = JAX steps/s / TorchJD steps/s;
aggregation ms = the method's jitted `update` alone (no optimizer) on task grads of the step's
shapes, its state fed back; aggregation share = aggregation ms / JAX step ms; loss = the mean
task loss of the last step. `task grads only`: the forward pass and the T task gradients
(JAX: jitted `mtlopt.task_value_and_grad`; torch: `mtl_backward` / `autojac.backward`
without `jac_to_grad`). mtlopt methods are built with `num_tasks=T` (warm-started solvers);
TorchJD has no DB-MTL (n/a). Scales differ where the libraries differ (TorchJD's CAGrad is
mtlopt's `rescale=0`); with Adam this hardly matters, with SGD it shows in the loss."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (CI, seconds)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per bench, every case")
    p.add_argument(
        "--cases", nargs="+", default=None, help=f"full-mode cases, of {' '.join(CASES)}"
    )
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-torch", action="store_true", help="skip torch and TorchJD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--malloc",
        choices=MALLOC_MODES,
        default="glibc",
        help="retain: glibc keeps freed memory instead of returning large blocks to the kernel "
        f"(see aggregation.py; full mode writes {RESULTS_RETAIN.name})",
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"Markdown file (full mode default: {RESULTS})"
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*donated buffers.*")

    cases = QUICK_CASES if args.quick else CASES
    if args.cases and not args.quick:
        unknown = [c for c in args.cases if c not in CASES]
        if unknown:
            p.error(f"unknown cases {unknown}; choose from {list(CASES)}")
        cases = {k: CASES[k] for k in args.cases}
    allocator = set_malloc(args.malloc)
    torch_mods = (None, None, None) if args.no_torch else load_torch(args.threads)

    lines = [
        "# Training step: mtlopt (JAX) vs TorchJD",
        "",
        environment(args.threads, torch_mods, allocator),
        "Written by `python benchmarks/train_step.py"
        + (" --quick" if args.quick else "")
        + (" --malloc retain" if args.malloc == "retain" else "")
        + "`.",
        "",
    ]
    for case in cases.values():
        start = time.perf_counter()
        lines += run_case(case, args.steps or case.steps, args.threads, torch_mods, args.seed)
        took = time.perf_counter() - start
        lines += ["", f"({took:.0f} s for this case)", ""]
        print(f"  {case.key}: {took:.1f} s", file=sys.stderr, flush=True)
    if torch_mods[0] is None and not args.no_torch:
        lines += ["torch / TorchJD not installed: pip install -e '.[bench]' for those columns.", ""]
    lines += [NOTES]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or (
        None if args.quick else RESULTS_RETAIN if args.malloc == "retain" else RESULTS
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
