"""One backward pass: the loss-weighting methods' training step against a plain single-loss step
and against the same method over T task gradients (issue 13's speed target).

One jitted Flax ``nnx`` training step of the shared-trunk MLP of ``train_step.py`` (trunk
Linear-ReLU-Linear-ReLU, T = 10 linear regression heads, weights stored ``(out, in)``), Adam
1e-3, in three forms:

(a) **plain**: one backward pass of the mean task loss, ``optax.adam``;
(b) **one pass**: ``w, state = mtlopt.loss_weights(method, stop_gradient(losses), state)``
    inside the loss function, one backward pass of ``sum_t w_t l_t``, then ``optax.adam``;
(c) **task grads**: ``mtlopt.task_value_and_grad`` (T backward passes under ``vmap``) and
    ``optax.chain(method, optax.adam(1e-3))``, the heads ``task_specific``.

The methods of (b) and (c) are found at run time: every public constructor of ``mtlopt`` whose
transformation accepts ``mtlopt.loss_weights(tx, losses, state)`` (see :func:`discover`), so
methods that land later get their row without an edit here.

The step is written two ways, ``nnx.jit`` with an ``nnx.Optimizer`` (the model and optimizer
objects donated), and ``nnx.split`` once then ``jax.jit`` over the params pytree with
``nnx.merge`` inside (params and states donated). A short probe times the plain step both ways
first; every row then uses the faster one, and the table says which.

Timing as in ``train_step.py``: two warm-up steps, then ``--steps`` timed steps of every bench,
each bench running ``block`` consecutive steps in a turn, the benches in an order drawn afresh
every turn (:func:`train_step.run_alternating`); medians; every step ends in
``block_until_ready``; the load average before and after is noted (only ratios from one run
mean much on a shared machine).

    python benchmarks/one_pass.py            # ~1e6 parameters; writes results/one_pass.md
    python benchmarks/one_pass.py --quick    # tiny sizes, few steps (CI, seconds)

See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
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
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import MALLOC_MODES, Bench, cpu_name, set_malloc
from train_step import WARMUP, run_alternating

from mtlopt._src import build  # the declared extra arguments of a method

RESULTS = Path(__file__).resolve().parent / "results" / "one_pass.md"
TARGET = 1.3  # issue 13: a one-pass step at most 1.3x the plain step
EPOCH = 10  # a flag signal (an epoch boundary, e.g. dwa's new_epoch) is True every EPOCH steps


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    d_in: int
    hidden: int
    tasks: int
    batch: int
    steps: int
    block: int

    @property
    def num_params(self) -> int:
        d, h, t = self.d_in, self.hidden, self.tasks
        return d * h + h + h * h + h + h * t + t


CASES = {"1e6": Case("1e6", 256, 896, 10, batch=256, steps=30, block=3)}
QUICK = Case("quick", 16, 32, 10, batch=16, steps=3, block=1)
PROBE_STEPS = 10  # per style, full mode (quick: 2)


# --------------------------------------------------------------------------------------------
# The model


class Dense(nnx.Module):
    """``x @ w.T + b`` with ``w`` stored ``(out, in)``, torch's default init range (as in
    ``train_step.py``: XLA then lays out the per-task weight gradients without a transpose)."""

    def __init__(self, d_in: int, d_out: int, rng: np.random.Generator):
        bound = 1.0 / np.sqrt(d_in)
        self.w = nnx.Param(jnp.asarray(rng.uniform(-bound, bound, (d_out, d_in)), jnp.float32))
        self.b = nnx.Param(jnp.asarray(rng.uniform(-bound, bound, (d_out,)), jnp.float32))

    def __call__(self, x):
        return x @ self.w[...].T + self.b[...]


class Net(nnx.Module):
    """A shared trunk and T linear heads (head t is row t of ``heads``)."""

    def __init__(self, case: Case, seed: int):
        rng = np.random.default_rng(seed)
        self.l1 = Dense(case.d_in, case.hidden, rng)
        self.l2 = Dense(case.hidden, case.hidden, rng)
        self.heads = Dense(case.hidden, case.tasks, rng)

    def __call__(self, x):
        h = jax.nn.relu(self.l1(x))
        h = jax.nn.relu(self.l2(h))
        return self.heads(h)


def task_losses(model, x, y):
    return jnp.mean((model(x) - y) ** 2, axis=0)


def make_data(case: Case, seed: int):
    """The synthetic regression of ``train_step.py``: a random teacher, tasks over a decade."""
    rng = np.random.default_rng(seed + 1)
    d, T, B = case.d_in, case.tasks, case.batch
    x = rng.standard_normal((B, d), dtype=np.float32)
    A = rng.standard_normal((d, 16), dtype=np.float32) / np.sqrt(d, dtype=np.float32)
    C = rng.standard_normal((16, T), dtype=np.float32)
    scale = np.exp(rng.uniform(np.log(0.3), np.log(3.0), T)).astype(np.float32)
    y = (np.tanh(x @ A) @ C) * scale + 0.1 * rng.standard_normal((B, T), dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(y.astype(np.float32))


def heads_spec(structs):
    """``task_specific=``: the leaves under ``heads``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path).startswith("['heads']"), structs
    )


# --------------------------------------------------------------------------------------------
# Discovery of the one-backward-pass methods

# Public functions that are not methods (skipped without trying them).
NOT_METHODS = {
    "task_value_and_grad",
    "task_weights",
    "loss_weights",
    "weights_from_gramian",
    "gramian",
    "combine",
    "cagrad_fast_groups",
    "cagrad_fast_weights",
    "native_kernel_available",
    "log_transform",  # a task -> task transform, not an aggregator
}
# Values for required constructor arguments, by name (T -> value); any other required argument
# leaves the method out (listed under the table).
REQUIRED = {
    "preference": lambda T: np.full(T, 1.0 / T, np.float32),
    "weights": lambda T: np.linspace(1.0, 2.0, T, dtype=np.float32) / T,
    "num_tasks": lambda T: T,
}
# Per-method constructor keywords beyond the defaults (none needed today).
OVERRIDES: dict[str, dict] = {}


@dataclasses.dataclass(frozen=True)
class Found:
    name: str
    label: str
    make: Callable[[Any], Any]  # task_specific -> transformation
    flags: tuple[str, ...]  # flag signals passed every step (True every EPOCH steps)
    vectors: tuple[str, ...]  # required task_vector signals: passed this step's losses


def declared_signals(tx) -> tuple:
    """The extra arguments a method declares (``build.Signal``), read from the closure of its
    update function; () if none is found."""
    seen, todo = set(), [tx.update]
    while todo:
        fn = todo.pop()
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, build.Method):
                return value.signals
            if callable(value) and id(value) not in seen:
                seen.add(id(value))
                todo.append(value)
    return ()


def discover(T: int, params) -> tuple[list[Found], dict[str, str]]:
    """Every public constructor whose transformation gives its weights from the losses alone
    (``mtlopt.loss_weights`` traces), and why the others were left out."""
    found, skipped = [], {}
    for name in sorted(mtlopt.__all__):
        fn = getattr(mtlopt, name)
        if name in NOT_METHODS or not name.islower() or not inspect.isfunction(fn):
            continue
        sig = inspect.signature(fn)
        kwargs = dict(OVERRIDES.get(name, {}))
        missing = []
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in kwargs:
                continue
            if p.name == "num_tasks" or p.default is inspect.Parameter.empty:
                if p.name in REQUIRED:
                    kwargs[p.name] = REQUIRED[p.name](T)
                elif p.default is inspect.Parameter.empty:
                    missing.append(p.name)
        if missing:
            skipped[name] = f"needs {', '.join(missing)}"
            continue
        takes_heads = "task_specific" in sig.parameters

        def make(task_specific, fn=fn, kwargs=kwargs, takes_heads=takes_heads):
            extra = {"task_specific": task_specific} if takes_heads else {}
            return fn(**kwargs, **extra)

        try:
            tx = make(None)
            if not isinstance(tx, optax.GradientTransformation):
                continue
            signals = declared_signals(tx)
            flags = tuple(s.name for s in signals if s.kind == "flag")
            vectors = tuple(s.name for s in signals if s.kind == "task_vector" and s.required)
            other = [s.name for s in signals if s.required and s.kind in ("gramian", "task_grads")]
            if other:
                skipped[name] = f"needs the extra arguments {other}"
                continue
            state = tx.init(params)
            losses = jnp.ones(T)
            extra = {f: jnp.asarray(False) for f in flags}
            extra.update({v: losses for v in vectors})
            probe = lambda s, tx=tx, e=extra, l=losses: mtlopt.loss_weights(tx, l, s, **e)
            jax.eval_shape(probe, state)
        except ValueError as e:
            if "task_grads=None" not in str(e):
                skipped[name] = f"{type(e).__name__}: {str(e)[:120]}"
            continue  # a method over task grads: not a one-pass method
        except Exception as e:  # a task transform, or anything else that is not a method
            skipped[name] = f"{type(e).__name__}: {str(e)[:120]}"
            continue
        shown = {k: ("ones/T" if k == "preference" else v) for k, v in kwargs.items()}
        shown = {k: v for k, v in shown.items() if k not in ("num_tasks", "weights")}
        label = f"{name}({', '.join(f'{k}={v}' for k, v in shown.items())})"
        found.append(Found(name, label, make, flags, vectors))
    return found, skipped


# --------------------------------------------------------------------------------------------
# Steps: (a) plain, (b) one pass, (c) task grads, in either style


def _mean_loss(losses_fn):
    """The plain objective, the mean task loss, with the losses as aux (no second forward)."""

    def fn(p):
        losses = losses_fn(p)
        return jnp.mean(losses), losses

    return fn


def _extra(f: Found, counter, losses):
    out = {n: counter % EPOCH == 0 for n in f.flags}
    out.update({n: jax.lax.stop_gradient(losses) for n in f.vectors})
    return out


class Functional:
    """``nnx.split`` once; ``jax.jit`` over the params pytree, ``nnx.merge`` inside; params,
    optimizer state, method state and step counter donated."""

    name = "nnx.split/merge + jax.jit (donated)"
    key = "split"

    def __init__(self, case: Case, seed: int, x, y):
        self.case, self.seed, self.x, self.y = case, seed, x, y
        self.graphdef, _ = nnx.split(Net(case, seed))

    def params(self):
        return nnx.split(Net(self.case, self.seed))[1]

    def losses(self, p):
        return task_losses(nnx.merge(self.graphdef, p), self.x, self.y)

    def _bench(self, label, step, args, kind):
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=tuple(range(len(args)))).lower(*args).compile()
        compile_s = time.perf_counter() - start
        box = {"args": args, "loss": None}

        def call():
            *box["args"], box["loss"] = compiled(*box["args"])
            jax.block_until_ready((box["args"], box["loss"]))

        return Bench(label, call, info={"compile_s": compile_s, "box": box, "kind": kind})

    def plain(self, label="plain"):
        adam = optax.adam(1e-3)

        def step(params, ostate, counter):
            (_, losses), g = jax.value_and_grad(_mean_loss(self.losses), has_aux=True)(params)
            u, ostate = adam.update(g, ostate, params)
            return optax.apply_updates(params, u), ostate, counter + 1, losses

        p = self.params()
        return self._bench(label, step, (p, adam.init(p), jnp.zeros((), jnp.int32)), "plain")

    def one_pass(self, f: Found):
        adam, method = optax.adam(1e-3), f.make(None)

        def step(params, ostate, mstate, counter):
            def total(p):
                losses = self.losses(p)
                w, new = mtlopt.loss_weights(
                    method, jax.lax.stop_gradient(losses), mstate, **_extra(f, counter, losses)
                )
                return jnp.dot(w, losses), (new, losses)

            (_, (mstate, losses)), g = jax.value_and_grad(total, has_aux=True)(params)
            u, ostate = adam.update(g, ostate, params)
            return optax.apply_updates(params, u), ostate, mstate, counter + 1, losses

        p = self.params()
        args = (p, adam.init(p), method.init(p), jnp.zeros((), jnp.int32))
        return self._bench(f.label, step, args, "one pass")

    def task_grads(self, f: Found):
        tx = optax.chain(f.make(heads_spec), optax.adam(1e-3))
        grad_fn = mtlopt.task_value_and_grad(self.losses)

        def step(params, state, counter):
            losses, g = grad_fn(params)
            u, state = tx.update(g, state, params, task_losses=losses, **_extra(f, counter, losses))
            return optax.apply_updates(params, u), state, counter + 1, losses

        p = self.params()
        return self._bench(f.label, step, (p, tx.init(p), jnp.zeros((), jnp.int32)), "task grads")


class Objects:
    """``nnx.jit`` over the model and an ``nnx.Optimizer`` (``wrt=nnx.Param``), both donated
    with the method state and step counter."""

    name = "nnx.jit + nnx.Optimizer (donated)"
    key = "nnx.jit"

    def __init__(self, case: Case, seed: int, x, y):
        self.case, self.seed, self.x, self.y = case, seed, x, y

    def _bench(self, label, step, args, kind):
        fn = nnx.jit(step, donate_argnums=tuple(range(len(args))))
        box = {"args": list(args), "loss": None}
        start = time.perf_counter()

        def call():
            *rest, box["loss"] = fn(*box["args"])
            box["args"][2:] = rest  # the model and optimizer objects are updated in place
            jax.block_until_ready((rest, box["loss"]))

        call()  # compiles (nnx.jit has no lower/compile split over graph objects)
        compile_s = time.perf_counter() - start
        return Bench(label, call, info={"compile_s": compile_s, "box": box, "kind": kind})

    def plain(self, label="plain"):
        model = Net(self.case, self.seed)
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        x, y = self.x, self.y

        def step(model, opt, counter):
            fn = _mean_loss(lambda m: task_losses(m, x, y))
            (_, losses), g = nnx.value_and_grad(fn, has_aux=True)(model)
            opt.update(model, g)
            return counter + 1, losses

        return self._bench(label, step, (model, opt, jnp.zeros((), jnp.int32)), "plain")

    def one_pass(self, f: Found):
        model = Net(self.case, self.seed)
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        method, x, y = f.make(None), self.x, self.y

        def step(model, opt, mstate, counter):
            def total(m):
                losses = task_losses(m, x, y)
                w, new = mtlopt.loss_weights(
                    method, jax.lax.stop_gradient(losses), mstate, **_extra(f, counter, losses)
                )
                return jnp.dot(w, losses), (new, losses)

            (_, (mstate, losses)), g = nnx.value_and_grad(total, has_aux=True)(model)
            opt.update(model, g)
            return mstate, counter + 1, losses

        mstate = method.init(nnx.state(model, nnx.Param))
        args = (model, opt, mstate, jnp.zeros((), jnp.int32))
        return self._bench(f.label, step, args, "one pass")

    def task_grads(self, f: Found):
        model = Net(self.case, self.seed)
        tx = optax.chain(f.make(heads_spec), optax.adam(1e-3))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x, y = self.x, self.y

        def step(model, opt, counter):
            graphdef, params = nnx.split(model, nnx.Param)
            fn = lambda p: task_losses(nnx.merge(graphdef, p), x, y)
            losses, g = mtlopt.task_value_and_grad(fn)(params)
            opt.update(model, g, task_losses=losses, **_extra(f, counter, losses))
            return counter + 1, losses

        return self._bench(f.label, step, (model, opt, jnp.zeros((), jnp.int32)), "task grads")


STYLES = (Functional, Objects)


# --------------------------------------------------------------------------------------------
# The run


def _fmt(x, spec=".2f"):
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def _last_loss(b: Bench | None):
    if b is None or b.info["box"]["loss"] is None:
        return None
    return float(np.mean(np.asarray(b.info["box"]["loss"])))


def run(case: Case, steps: int, probe_steps: int, seed: int, force: str = "auto") -> list[str]:
    x, y = make_data(case, seed)
    T = case.tasks
    # The probe: the plain step both ways; the faster style builds every row.
    styles = [S(case, seed, x, y) for S in STYLES]
    probes = [s.plain(f"plain, {s.name}") for s in styles]
    run_alternating([probes], probe_steps, WARMUP, max(1, case.block), seed)
    best = min(range(len(styles)), key=lambda i: probes[i].ms)
    if force != "auto":
        best = [S.key for S in STYLES].index(force)
    style = styles[best]
    probe_line = "; ".join(f"{b.name}: {b.ms:.2f} ms" for b in probes)
    for b in probes:
        b.times.clear()

    found, skipped = discover(T, styles[0].params())
    start = time.perf_counter()
    plain = probes[best]
    other = probes[1 - best]
    rows = []
    for f in found:
        rows.append((f, style.one_pass(f), style.task_grads(f)))
    compile_s = time.perf_counter() - start
    benches = [plain, other] + [b for _, b1, b2 in rows for b in (b1, b2)]
    load0 = os.getloadavg()
    run_alternating([benches], steps, WARMUP, case.block, seed)
    load1 = os.getloadavg()

    lines = [
        f"### Shared-trunk MLP, {case.num_params:.2e} parameters (input {case.d_in}, trunk "
        f"Linear-ReLU-Linear-ReLU of width {case.hidden}, {T} linear heads), batch "
        f"{case.batch}, MSE, Adam 1e-3",
        "",
        f"Style: the plain step timed both ways first (median of {probe_steps} steps each: "
        f"{probe_line}); every row below uses **{style.name}**"
        f"{', the faster' if force == 'auto' else ' (--style)'}. Median of {steps} "
        f"steps after {WARMUP} warm-up steps, {case.block} consecutive steps a turn. Compile "
        f"time of the method rows: {compile_s:.1f} s. Load average (1, 5, 15 min) before / "
        f"after timing: {_load(load0)} / {_load(load1)}.",
        "",
        f"Plain step (a): {plain.ms:.2f} ms ({style.name}); the other style, re-timed with "
        f"the rows: {other.ms:.2f} ms.",
        "",
        "| method | one pass ms | one pass / plain | target | task grads ms | task grads / one "
        "pass | compile s (one pass, task grads) | loss one pass | loss task grads |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for f, b1, b2 in rows:
        r1 = b1.ms / plain.ms
        ok = "pass" if r1 <= TARGET else "FAIL"
        lines.append(
            f"| `{f.label}` | {_fmt(b1.ms)} | {_fmt(r1)}x | <= {TARGET}x: {ok} | {_fmt(b2.ms)} "
            f"| {_fmt(b2.ms / b1.ms)}x | {b1.info['compile_s']:.1f}, {b2.info['compile_s']:.1f} "
            f"| {_fmt(_last_loss(b1), '.4f')} | {_fmt(_last_loss(b2), '.4f')} |"
        )
    lines += ["", f"Plain step's loss at the end: {_fmt(_last_loss(plain), '.4f')}."]
    if skipped:
        lines += ["", "Not timed (no value here for a required argument, or not buildable):"]
        lines += [f"- `{k}`: {v}" for k, v in sorted(skipped.items())]
    return lines


def _load(load) -> str:
    return ", ".join(f"{v:.1f}" for v in load)


NOTES = f"""\
Columns: **one pass ms**: median ms of (b), the method's weights from
`mtlopt.loss_weights(method, stop_gradient(losses), state)` inside the loss function and one
backward pass of `sum_t w_t l_t`, then Adam; **one pass / plain**: over (a), one backward pass
of the mean loss then Adam (issue 13's target: at most {TARGET}x); **task grads ms**: median
ms of (c), `mtlopt.task_value_and_grad` (T backward passes under `vmap`) and
`optax.chain(method, optax.adam(1e-3))` with the heads `task_specific`; **task grads / one
pass**: (c) / (b); **compile s**: lowering and compiling each step (`nnx.jit`: its first call);
**loss**: the mean task loss at the last step (same start, same data, the same weights in
both modes: (b) and (c) differ only by float rounding, which Adam blows up on coordinates whose
gradient is near 0 and which a method whose weights follow the losses feeds back, so they agree
to a few digits for some methods and drift apart for others over the steps). Methods are
built with `num_tasks=T` where they take it, the preference ones with `preference=ones/T`,
`linear` with `linspace(1, 2, T) / T`; a flag argument (an epoch boundary: `new_epoch`) is
True every {EPOCH} steps, a required `(T,)` argument gets the step's losses."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (CI, seconds)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help=f"Markdown file (default: {RESULTS})")
    p.add_argument(
        "--malloc",
        choices=MALLOC_MODES,
        default="glibc",
        help="retain: glibc keeps freed memory (see train_step.py): the task-grads steps' large "
        "temporaries then cost the steps after them no page faults",
    )
    p.add_argument(
        "--style",
        choices=["auto"] + [S.key for S in STYLES],
        default="auto",
        help="the step's form for every row (auto: the faster plain step in the probe)",
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    warnings.filterwarnings("ignore", message=".*[Dd]onat.*")

    allocator = set_malloc(args.malloc)
    case = QUICK if args.quick else CASES["1e6"]
    steps = args.steps or case.steps
    probe_steps = 2 if args.quick else PROBE_STEPS
    cmd = "python benchmarks/one_pass.py" + (" --quick" if args.quick else "")
    if args.steps:
        cmd += f" --steps {args.steps}"
    if args.style != "auto":
        cmd += f" --style {args.style}"
    if args.malloc != "glibc":
        cmd += f" --malloc {args.malloc}"
    start = time.perf_counter()
    lines = [
        "# One backward pass: loss weighting against a plain step and against T task grads",
        "",
        f"mtlopt {mtlopt.__version__}, jax {jax.__version__} ({jax.default_backend()}), optax "
        f"{optax.__version__}, flax {_flax_version()}; {cpu_name()}, "
        f"{len(os.sched_getaffinity(0))} CPUs, float32; {allocator}. Written by `{cmd}`.",
        "",
    ]
    lines += run(case, steps, probe_steps, args.seed, args.style)
    lines += ["", f"({time.perf_counter() - start:.0f} s in all)", "", NOTES]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


def _flax_version() -> str:
    import flax

    return flax.__version__


if __name__ == "__main__":
    sys.exit(main())
