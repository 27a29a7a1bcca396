"""MultiDigits: every mtlopt method trains one shared-trunk network on real digits, against
single-task baselines, with per-task test metrics and Delta_m%.

The data (``mtlopt.datasets.multidigits``) are pairs of scikit-learn's bundled 8x8 digits on
a 10 x 14 canvas, with two task sets: T = 2 (the class of the left digit, of the right digit)
and a heterogeneous T = 4 (both classes, the sum of the two digits as a regression with squared
error, and whether left > right as a binary task).

Each method is ``optax.chain(method, optax.adam(lr))`` on a shared-trunk MLP (two hidden ReLU
layers) with one head per task, the heads task-specific (``task_specific=``: each follows its
own task's gradient; the method acts on the trunk). The task grads come from
``mtlopt.task_value_and_grad`` and the losses go to every update (``task_losses=``). One program
per method trains every seed at once (``jax.vmap`` over seeds: initial weights, batch order and
the method's own PRNG key) over the whole run (``lax.scan`` over epochs of ``lax.scan`` over
batches), then evaluates on the test pairs; it is compiled once (timed) and run once (timed).
The single-task baselines train one network per task, on that task alone, with the same
architecture, optimizer, batches and budget, in one program of the same form.

Delta_m% (Maninis et al. 2019; LibMTL's sign): the average over tasks of
``s_t (M_t - B_t) / B_t * 100``, where ``M_t`` is the method's test metric, ``B_t`` the
single-task baselines' (mean over seeds), ``s_t = +1`` where higher is better (accuracy) and
-1 where lower is better (the sum's mean absolute error): positive is better than the
baselines. The Nash-MTL and FAMO code reports the opposite sign (lower is better there). It is
computed per seed, then averaged (mean +/- std over seeds).

    python benchmarks/multidigits.py             # every method, T = 2 and 4, 3 seeds: 10-14 min
    python benchmarks/multidigits.py --quick     # mean, cagrad, db_mtl, famo; 2 seeds: 1-2 min

Writes ``results/multidigits.md``, ``results/multidigits.json`` (every seed's metrics and the
timings; ``--replot`` redraws the figures from it) and
``results/multidigits_{metrics,tradeoff}.png`` (with
``--quick``: prints the table and writes files only where ``--out`` is given). See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

try:  # run from a checkout without `pip install -e .`
    import mtlopt
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mtlopt

import contextlib

import jax
import jax.numpy as jnp
import optax
from jax import lax

import mtlopt.datasets

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# The methods: every public method of mtlopt, each with its default hyperparameters.


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table: ``make(T, task_specific, key)`` builds the transformation that
    goes in front of the optimizer (``key``: a PRNG key, distinct per seed, for the methods that
    draw random numbers)."""

    name: str
    make: Callable[[int, Any, jax.Array], optax.GradientTransformationExtraArgs]
    covers: tuple[str, ...]  # the public names of mtlopt this row runs
    note: str = ""  # the choice made for a required argument
    min_tasks: int = 1
    new_epoch: bool = False  # passes the extra argument new_epoch (DWA's epoch form)


def _ones(T):
    return np.ones(T, np.float32)


def _m(name, make, note="", **kw):
    return Method(name, make, covers=(name,), note=note, **kw)


def _log(method):
    def make(T, ts, key):
        return optax.chain(mtlopt.log_transform(num_tasks=T), method.make(T, ts, key))

    return Method(f"log_transform + {method.name}", make, ("log_transform", *method.covers))


METHODS: list[Method] = [
    _m("mean", lambda T, ts, k: mtlopt.mean(num_tasks=T, task_specific=ts)),
    _m(
        "linear",
        lambda T, ts, k: mtlopt.linear(_ones(T), num_tasks=T, task_specific=ts),
        note="weights = ones(T): the sum of the task gradients",
    ),
    _m("cagrad", lambda T, ts, k: mtlopt.cagrad(num_tasks=T, task_specific=ts)),
    _m("mgda", lambda T, ts, k: mtlopt.mgda(num_tasks=T, task_specific=ts)),
    _m("pcgrad", lambda T, ts, k: mtlopt.pcgrad(k, num_tasks=T, task_specific=ts)),
    _m("db_mtl", lambda T, ts, k: mtlopt.db_mtl(T, task_specific=ts)),
    _m("upgrad", lambda T, ts, k: mtlopt.upgrad(num_tasks=T, task_specific=ts)),
    _m("dualproj", lambda T, ts, k: mtlopt.dualproj(num_tasks=T, task_specific=ts)),
    _m("imtl_g", lambda T, ts, k: mtlopt.imtl_g(num_tasks=T, task_specific=ts)),
    _m("nash_mtl", lambda T, ts, k: mtlopt.nash_mtl(num_tasks=T, task_specific=ts)),
    _m("aligned_mtl", lambda T, ts, k: mtlopt.aligned_mtl(num_tasks=T, task_specific=ts)),
    _m("config", lambda T, ts, k: mtlopt.config(num_tasks=T, task_specific=ts)),
    _m("gradvac", lambda T, ts, k: mtlopt.gradvac(seed=k, num_tasks=T, task_specific=ts)),
    _m("graddrop", lambda T, ts, k: mtlopt.graddrop(seed=k, num_tasks=T, task_specific=ts)),
    _m(
        "krum",
        lambda T, ts, k: mtlopt.krum(0, num_tasks=T, task_specific=ts),
        note="n_byzantine = 0 (needs T >= 3)",
        min_tasks=3,
    ),
    _m(
        "trimmed_mean",
        lambda T, ts, k: mtlopt.trimmed_mean(1 if T >= 3 else 0, num_tasks=T, task_specific=ts),
        note="trim_number = 1 for T >= 3 (0, the mean, for T = 2)",
    ),
    _m("ntkmtl", lambda T, ts, k: mtlopt.ntkmtl(num_tasks=T, task_specific=ts)),
    _m(
        "dwa",
        lambda T, ts, k: mtlopt.dwa(num_tasks=T, task_specific=ts),
        note="new_epoch=True on the first batch of every epoch",
        new_epoch=True,
    ),
    _m("rlw", lambda T, ts, k: mtlopt.rlw(k, num_tasks=T, task_specific=ts)),
    _m("famo", lambda T, ts, k: mtlopt.famo(num_tasks=T, task_specific=ts)),
    _m("gradnorm", lambda T, ts, k: mtlopt.gradnorm(num_tasks=T, task_specific=ts)),
    _m("uw", lambda T, ts, k: mtlopt.uw(num_tasks=T, task_specific=ts)),
    _m("imtl_l", lambda T, ts, k: mtlopt.imtl_l(num_tasks=T, task_specific=ts)),
    _m("imtl", lambda T, ts, k: mtlopt.imtl(num_tasks=T, task_specific=ts)),
    _m("gls", lambda T, ts, k: mtlopt.gls(num_tasks=T, task_specific=ts)),
    _m("stch", lambda T, ts, k: mtlopt.stch(num_tasks=T, task_specific=ts)),
    _m(
        "cosmos",
        lambda T, ts, k: mtlopt.cosmos(_ones(T), num_tasks=T, task_specific=ts),
        note="preference = ones(T) (uniform)",
    ),
    _m(
        "pbi",
        lambda T, ts, k: mtlopt.pbi(_ones(T), num_tasks=T, task_specific=ts),
        note="preference = ones(T) (uniform)",
    ),
]
METHODS += [
    _m("fairgrad", lambda T, ts, k: mtlopt.fairgrad(num_tasks=T, task_specific=ts)),
    _m(
        "pcd",
        lambda T, ts, k: mtlopt.pcd(num_tasks=T, task_specific=ts),
        note="its defaults: the first task (left) is the primary one",
    ),
    _m(
        "modo",
        lambda T, ts, k: mtlopt.modo(num_tasks=T, task_specific=ts),
        note="one sample of task grads per step (no second_sample=)",
    ),
    _m(
        "sdmgrad",
        lambda T, ts, k: mtlopt.sdmgrad(num_tasks=T, task_specific=ts),
        note="one sample of task grads per step (no second_sample=)",
    ),
    _m("moco", lambda T, ts, k: mtlopt.moco(num_tasks=T, task_specific=ts)),
    _m("excess_mtl", lambda T, ts, k: mtlopt.excess_mtl(num_tasks=T, task_specific=ts)),
    # The weight modifiers, around MGDA (whose weights jump most from batch to batch).
    Method(
        "smooth_weights(mgda)",
        lambda T, ts, k: mtlopt.smooth_weights(mtlopt.mgda(num_tasks=T, task_specific=ts)),
        ("smooth_weights", "mgda"),
        note="alpha = 0.9 (its default)",
    ),
    Method(
        "refresh_weights(mgda, 10)",
        lambda T, ts, k: mtlopt.refresh_weights(mtlopt.mgda(num_tasks=T, task_specific=ts), 10),
        ("refresh_weights", "mgda"),
        note="MGDA's weights recomputed every 10 steps",
    ),
]
# A row whose method this version of mtlopt lacks is left out (the runner works at any commit).
METHODS = [m for m in METHODS if all(hasattr(mtlopt, c) for c in m.covers)]
_BY_NAME = {m.name: m for m in METHODS}
METHODS += [_log(_BY_NAME[n]) for n in ("mean", "cagrad", "mgda", "upgrad")]
# One setting other than the default, where it changes the verdict: DB-MTL's EMA weight
# decaying as beta / k**0.5 (its beta_sigma) instead of a constant 0.9 on top of Adam.
METHODS.append(
    Method(
        "db_mtl(beta_sigma=0.5)",
        lambda T, ts, k: mtlopt.db_mtl(T, beta_sigma=0.5, task_specific=ts),
        ("db_mtl",),
        note="not the default: the EMA weight decays as 0.9 / k**0.5",
    )
)
_BY_NAME = {m.name: m for m in METHODS}

# Public names of mtlopt that are not methods to train with (helpers, states, diagnostics).
# tests/test_benchmarks.py checks that every other public name is covered by a row above.
NOT_METHODS = {
    "cagrad_fast_groups",  # a sampling helper for cagrad(g0_weights=...)
    "cagrad_fast_weights",
    "combine",
    "gramian",
    "loss_weights",
    "native_kernel_available",
    "native_kernel_status",
    "task_value_and_grad",
    "task_weights",
    "weights_from_gramian",
    "diagnostics",  # gradient diagnostics (norms, cosines, conflicts)
    "with_diagnostics",
    "task_diagnostics",
    "accumulate",  # gradient accumulation over micro-batches: a wrapper around any method
    "by_path",  # a task_specific= spec builder
}

QUICK_METHODS = ("mean", "cagrad", "db_mtl", "famo")


def public_methods() -> set[str]:
    """The lower-case public names of mtlopt that are not in NOT_METHODS."""
    return {n for n in mtlopt.__all__ if n[:1].islower()} - NOT_METHODS


# --------------------------------------------------------------------------------------------
# The network: a shared-trunk MLP (weights stored (out, in): see task_value_and_grad's note).


def _dense(key, n_in, n_out):
    w = jax.random.normal(key, (n_out, n_in)) * jnp.sqrt(2.0 / n_in)
    return {"w": w, "b": jnp.zeros((n_out,))}


def _apply(layer, h):
    return h @ layer["w"].T + layer["b"]


def init_model(key, n_in, hidden, output_sizes):
    keys = jax.random.split(key, len(hidden) + len(output_sizes))
    sizes = (n_in, *hidden)
    trunk = [_dense(keys[i], sizes[i], sizes[i + 1]) for i in range(len(hidden))]
    heads = [_dense(keys[len(hidden) + t], hidden[-1], n) for t, n in enumerate(output_sizes)]
    return {"trunk": trunk, "heads": heads}


def _features(params, x):
    h = x.reshape(x.shape[0], -1)
    for layer in params["trunk"]:
        h = jax.nn.relu(_apply(layer, h))
    return h


def _task_loss(kind, out, y):
    if kind == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    if kind == "binary":
        return optax.sigmoid_binary_cross_entropy(out[:, 0], y.astype(out.dtype)).mean()
    return jnp.mean((out[:, 0] - y.astype(out.dtype)) ** 2)


def _task_metric(kind, out, y):
    if kind == "classification":
        return jnp.mean(jnp.argmax(out, -1) == y)
    if kind == "binary":
        return jnp.mean((out[:, 0] > 0) == (y == 1))
    return jnp.mean(jnp.abs(out[:, 0] - y))  # mean absolute error


def task_losses(params, x, y, kinds, tasks=None):
    """The (T,) losses of the heads in ``tasks`` (default: all) on one batch."""
    h = _features(params, x)
    tasks = range(len(kinds)) if tasks is None else tasks
    outs = [_apply(head, h) for head in params["heads"]]
    return jnp.stack([_task_loss(kinds[t], o, y[:, t]) for t, o in zip(tasks, outs, strict=True)])


def test_metrics(params, x, y, kinds, tasks=None):
    h = _features(params, x)
    tasks = range(len(kinds)) if tasks is None else tasks
    outs = [_apply(head, h) for head in params["heads"]]
    return jnp.stack([_task_metric(kinds[t], o, y[:, t]) for t, o in zip(tasks, outs, strict=True)])


# --------------------------------------------------------------------------------------------
# One program per method: every seed under vmap, every epoch and batch under lax.scan.


@dataclasses.dataclass(frozen=True)
class Config:
    epochs: int
    batch: int
    lr: float
    hidden: tuple[int, ...]


def batches(seeds, n, cfg: Config):
    """The batch indices of every step, ``(S, steps, batch)`` int32, and the ``(steps,)`` bool
    flags of each epoch's first step: every seed shuffles the training pairs afresh each epoch
    (numpy, drawn on the host: a sort inside the program costs compile time, not run time)."""
    per_epoch = n // cfg.batch
    out = np.empty((len(seeds), cfg.epochs * per_epoch, cfg.batch), np.int32)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng([int(seed), 1])
        for e in range(cfg.epochs):
            perm = rng.permutation(n)[: per_epoch * cfg.batch].reshape(per_epoch, cfg.batch)
            out[i, e * per_epoch : (e + 1) * per_epoch] = perm
    firsts = np.arange(cfg.epochs * per_epoch) % per_epoch == 0
    return out, firsts


def make_program(method: Method | None, data, cfg: Config):
    """A jitted ``f(seeds, batches, firsts, x_train, y_train, x_test, y_test) -> (metrics
    (S, T), losses (S, steps, T))`` that trains one model per seed (``seeds`` (S,), ``batches``
    (S, steps, batch) from :func:`batches`) with ``method`` (None: the single-task baselines)
    and returns the test metrics after the last step and the training losses of every step."""
    kinds = data.task_kinds
    T = len(kinds)
    n_in = int(np.prod(data.x_train.shape[1:]))

    def one_seed(seed, batches, firsts, x_tr, y_tr, x_te, y_te):
        k_init, k_method = jax.random.split(jax.random.key(seed), 2)
        if method is None:  # T separate networks, each on its own task: the sum of their losses
            # has independent gradients per network, and Adam is per coordinate, so training
            # them together is training each alone.
            params = [
                init_model(jax.random.fold_in(k_init, t), n_in, cfg.hidden, (data.output_sizes[t],))
                for t in range(T)
            ]
            tx = optax.adam(cfg.lr)

            def grads_of(params, xb, yb):
                def total(params):
                    ls = jnp.concatenate(
                        [task_losses(p, xb, yb, kinds, (t,)) for t, p in enumerate(params)]
                    )
                    return ls.sum(), ls

                (_, losses), g = jax.value_and_grad(total, has_aux=True)(params)
                return losses, g

        else:
            params = init_model(k_init, n_in, cfg.hidden, data.output_sizes)
            heads = {"trunk": False, "heads": True}
            task_specific = jax.tree.map_with_path(lambda path, _: heads[path[0].key], params)
            tx = optax.chain(method.make(T, task_specific, k_method), optax.adam(cfg.lr))

            def grads_of(params, xb, yb):
                return mtlopt.task_value_and_grad(task_losses)(params, xb, yb, kinds)

        opt_state = tx.init(params)

        def step(carry, inputs):
            params, opt_state = carry
            idx, first = inputs
            losses, grads = grads_of(params, x_tr[idx], y_tr[idx])
            if method is None:
                updates, opt_state = tx.update(grads, opt_state, params)
            else:
                extra = {"new_epoch": first} if method.new_epoch else {}
                updates, opt_state = tx.update(
                    grads, opt_state, params, task_losses=losses, **extra
                )
            return (optax.apply_updates(params, updates), opt_state), losses

        (params, _), losses = lax.scan(step, (params, opt_state), (batches, firsts))
        if method is None:
            metrics = jnp.concatenate(
                [test_metrics(p, x_te, y_te, kinds, (t,)) for t, p in enumerate(params)]
            )
        else:
            metrics = test_metrics(params, x_te, y_te, kinds)
        return metrics, losses

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None, None, None, None, None)))


@dataclasses.dataclass
class Result:
    name: str
    metrics: np.ndarray  # (S, T) test metrics
    losses: np.ndarray  # (S, steps, T) training losses of every step
    compile_s: float
    train_s: float
    steps: int  # optimizer steps per seed
    note: str = ""

    @property
    def ms_per_step(self):
        return 1e3 * self.train_s / self.steps


def program_args(data, cfg, seeds):
    """The arguments of every program of one task set (the same seeds, batches and data)."""
    idx, firsts = batches(seeds, len(data.x_train), cfg)
    arrays = (seeds.astype(np.uint32), idx, firsts, data.x_train, data.y_train)
    return tuple(jnp.asarray(a) for a in (*arrays, data.x_test, data.y_test))


def compile_one(method, data, cfg, args):
    """``(compiled program, seconds)``: tracing, lowering and XLA compilation."""
    t0 = time.perf_counter()
    compiled = make_program(method, data, cfg).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def train_one(method, compiled, compile_s, args) -> Result:
    """Runs a compiled program (every seed at once) and times it."""
    t0 = time.perf_counter()
    metrics, losses = jax.block_until_ready(compiled(*args))
    train_s = time.perf_counter() - t0
    name = "single-task baselines" if method is None else method.name
    note = "" if method is None else method.note
    steps = args[1].shape[1]
    return Result(name, np.asarray(metrics), np.asarray(losses), compile_s, train_s, steps, note)


def run_one(method, data, cfg, seeds) -> Result:
    """Compiles and trains one row (``method`` None: the single-task baselines)."""
    args = program_args(data, cfg, np.asarray(seeds))
    return train_one(method, *compile_one(method, data, cfg, args), args)


# --------------------------------------------------------------------------------------------
# Delta_m% and the report.


def delta_m(metrics, baseline, higher_is_better):
    """Per-seed Delta_m% (positive is better): ``metrics`` (S, T), ``baseline`` (T,)."""
    sign = np.where(np.asarray(higher_is_better), 1.0, -1.0)
    return 100.0 * np.mean(sign * (metrics - baseline) / baseline, axis=1)


def _pm(values, scale=1.0, digits=2):
    v = np.asarray(values, np.float64) * scale
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def table(results: list[Result], data) -> str:
    """The Markdown table of one task set (the baselines first)."""
    base = results[0].metrics.mean(0)
    heads = []
    for name, metric in zip(data.task_names, data.metrics, strict=True):
        heads.append(f"{name} {'acc %' if metric == 'accuracy' else metric} {_arrow(metric)}")
    cols = ["method", *heads, "Δm% ↑", "compile s", "train s", "ms/step"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [f"`{r.name}`" if r.name != "single-task baselines" else r.name]
        for t, metric in enumerate(data.metrics):
            scale = 100.0 if metric == "accuracy" else 1.0
            cells.append(_pm(r.metrics[:, t], scale, 2 if scale == 100.0 else 3))
        cells.append(_pm(delta_m(r.metrics, base, data.higher_is_better)))
        cells += [f"{r.compile_s:.1f}", f"{r.train_s:.1f}", f"{r.ms_per_step:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _arrow(metric):
    return "↑" if metric == "accuracy" else "↓"


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in out.splitlines())
        )
        cpu = f"{info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs"
    except (OSError, subprocess.CalledProcessError):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}; {platform.system()} {platform.release()}; Python {platform.python_version()}"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def versions() -> str:
    names = ["jax", "jaxlib", "optax", "numpy", "scikit-learn"]
    out = [f"mtlopt {mtlopt.__version__}"]
    for n in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out.append(f"{n} {importlib.metadata.version(n)}")
    return ", ".join(out)


def _window(values, keep=()):
    """Axis limits that show every value of ``values`` and ``keep`` but a far outlier: at most
    two points at each end are left out, each only where its gap to the next point is larger
    than the span of the points kept (they are drawn at the edge with their value)."""
    v = np.sort(np.asarray(values, np.float64))
    lo_i, hi_i = 0, len(v)
    for _ in range(2):
        if hi_i - lo_i > 3 and v[lo_i + 1] - v[lo_i] > v[hi_i - 1] - v[lo_i + 1]:
            lo_i += 1
        if hi_i - lo_i > 3 and v[hi_i - 1] - v[hi_i - 2] > v[hi_i - 2] - v[lo_i]:
            hi_i -= 1
    inside = np.concatenate([v[lo_i:hi_i], np.asarray(keep, np.float64)])
    pad = 0.06 * max(inside.max() - inside.min(), 1e-6)
    return inside.min() - pad, inside.max() + pad


def _clipped(ax, x, y, lims, axis, label):
    """Draws a point outside ``lims`` (on ``axis``) at the edge, with its value."""
    lo, hi = lims
    v = x if axis == "x" else y
    edge = lo if v < lo else hi
    marker = {("x", True): "<", ("x", False): ">", ("y", True): "v", ("y", False): "^"}
    pos = (edge, y) if axis == "x" else (x, edge)
    ax.scatter(*pos, marker=marker[axis, v < lo], c="tab:red", s=18, zorder=4, clip_on=False)
    ax.annotate(
        f"{label} {v:.3g}",
        pos,
        fontsize=6,
        color="tab:red",
        xytext=(4, 3),
        textcoords="offset points",
    )


def plot(summary, out_dir: Path):
    """``multidigits_metrics.png`` and ``multidigits_tradeoff.png`` from :func:`summarize`'s
    dictionary (or the JSON written next to the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sets = summary["task_sets"]
    # Per-task test metrics per method (one row of panels per task set).
    n_rows = len(sets)
    n_cols = max(len(s["task_names"]) for s in sets.values())
    n_methods = max(len(s["rows"]) for s in sets.values())
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(3.2 * n_cols, 0.22 * n_methods * n_rows + 1.5), squeeze=False
    )
    for i, (T, s) in enumerate(sets.items()):
        rows = s["rows"]
        y = np.arange(len(rows))[::-1]
        for t in range(n_cols):
            ax = axes[i, t]
            if t >= len(s["task_names"]):
                ax.axis("off")
                continue
            metric = s["metrics"][t]
            scale = 100.0 if metric == "accuracy" else 1.0
            vals = np.array([np.asarray(r["metrics"])[:, t] * scale for r in rows])
            mean = vals.mean(1)
            err = vals.std(1, ddof=1) if vals.shape[1] > 1 else np.zeros(len(rows))
            lims = _window(mean, keep=[mean[0]])
            for k in range(len(rows)):
                color = "tab:gray" if k == 0 else "tab:blue"
                if lims[0] <= mean[k] <= lims[1]:
                    ax.errorbar(
                        mean[k], y[k], xerr=err[k], fmt="o", color=color, ecolor="k", ms=3.5, lw=0.8
                    )
                else:
                    _clipped(ax, mean[k], y[k], lims, "x", "")
            ax.set_xlim(*lims)
            ax.axvline(mean[0], color="tab:gray", ls="--", lw=0.8)
            ax.set_yticks(y)
            ax.set_yticklabels([r["name"] for r in rows] if t == 0 else [], fontsize=7)
            ax.set_ylim(-0.7, len(rows) - 0.3)
            unit = "accuracy %" if metric == "accuracy" else metric
            name = s["task_names"][t]
            ax.set_title(f"T={T}: {name} ({unit} {_arrow(metric)})", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "multidigits_metrics.png", dpi=120)
    plt.close(fig)

    # Delta_m% against the time per step (the trade-off).
    fig, axes = plt.subplots(1, n_rows, figsize=(6.5 * n_rows, 5), squeeze=False)
    for i, (T, s) in enumerate(sets.items()):
        ax = axes[0, i]
        rows = s["rows"]
        deltas = [np.asarray(r["delta_m"]) for r in rows]
        lims = _window([d.mean() for d in deltas], keep=[0.0])
        for k, (r, d) in enumerate(zip(rows, deltas, strict=True)):
            label = r["name"].replace("log_transform", "log")
            ms = r["ms_per_step"]
            if not lims[0] <= d.mean() <= lims[1]:
                _clipped(ax, ms, d.mean(), lims, "y", label)
                continue
            ax.errorbar(
                ms,
                d.mean(),
                yerr=d.std(ddof=1) if len(d) > 1 else None,
                fmt="s" if k == 0 else "o",
                color="tab:gray" if k == 0 else "tab:blue",
                ms=4,
                lw=0.8,
            )
            ax.annotate(
                label, (ms, d.mean()), fontsize=6, xytext=(3, 2), textcoords="offset points"
            )
        ax.set_ylim(*lims)
        ax.axhline(0.0, color="tab:gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.set_xlabel("ms per step (all seeds together, vmapped; a shared machine: noisy)")
        ax.set_ylabel("Δm% vs single-task baselines (higher is better)")
        ax.set_title(f"MultiDigits, T = {T}")
    fig.tight_layout()
    fig.savefig(out_dir / "multidigits_tradeoff.png", dpi=120)
    plt.close(fig)


def summarize(results: dict[int, list[Result]], datasets) -> dict:
    """Everything the plots need, as plain JSON-able values (per seed, per row)."""
    sets = {}
    for T, rows in results.items():
        data = datasets[T]
        base = rows[0].metrics.mean(0)
        sets[str(T)] = {
            "task_names": list(data.task_names),
            "metrics": list(data.metrics),
            "higher_is_better": list(data.higher_is_better),
            "rows": [
                {
                    "name": r.name,
                    "metrics": r.metrics.tolist(),
                    "delta_m": delta_m(r.metrics, base, data.higher_is_better).tolist(),
                    "compile_s": r.compile_s,
                    "train_s": r.train_s,
                    "steps": r.steps,
                    "ms_per_step": r.ms_per_step,
                }
                for r in rows
            ],
        }
    return {"task_sets": sets}


class _PlainProgress:
    """A stand-in for tqdm (its few uses here): one line per finished item on stderr."""

    def __init__(self, iterable=None, total=None, desc="", **_):
        self.iterable, self.desc, self.n = iterable, desc, 0
        self.total = len(iterable) if total is None else total

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, text):
        self.postfix = text

    def update(self, n=1):
        self.n += n
        print(f"{self.desc}: {self.n}/{self.total} {self.postfix}", file=sys.stderr, flush=True)

    postfix = ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few methods, 2 seeds, short budget")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated names of rows (default: all; --quick: "
        + ",".join(QUICK_METHODS)
        + ")",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (3; --quick 2)")
    p.add_argument("--tasks", default="2,4", help="task sets, comma-separated: 2, 4 or 2,4")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 30; --quick 15)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", default="128,128", help="trunk widths, comma-separated")
    p.add_argument("--n-train", type=int, default=10000, help="training pairs (default 10000)")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument(
        "--out",
        default=None,
        help="folder for multidigits.md and the PNGs (default benchmarks/results/; "
        "--quick writes nothing unless given)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="programs compiled at once (default 2; 1 for undisturbed compile times)",
    )
    p.add_argument(
        "--replot",
        default=None,
        metavar="JSON",
        help="redraw the PNGs from a multidigits.json, next to it (no training)",
    )
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    args = p.parse_args(argv)

    if args.replot:
        summary = json.loads(Path(args.replot).read_text())
        plot(summary, Path(args.replot).parent)
        print(f"wrote {Path(args.replot).parent}/multidigits_*.png")
        return
    if args.list:
        for m in METHODS:
            print(f"{m.name:28s} {m.note}")
        return
    quick = args.quick
    names = args.methods.split(",") if args.methods else (QUICK_METHODS if quick else None)
    if names is not None:
        unknown = [n for n in names if n not in _BY_NAME]
        if unknown:
            p.error(f"unknown methods {unknown}; see --list")
        methods = [_BY_NAME[n] for n in names]
    else:
        methods = list(METHODS)
    seeds = np.arange(args.seeds or (2 if quick else 3), dtype=np.int64)
    epochs = args.epochs or (15 if quick else 30)
    n_train = args.n_train
    task_sets = [int(t) for t in args.tasks.split(",")]
    out_dir = Path(args.out) if args.out else (None if quick else RESULTS)
    cfg = Config(epochs, args.batch, args.lr, tuple(int(h) for h in args.hidden.split(",")))

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the examples extra; without it, plain lines
        print('no progress bars: pip install "mtlopt[examples]" (tqdm)', file=sys.stderr)
        tqdm = _PlainProgress

    command = "python benchmarks/multidigits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = load()
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    datasets = {
        T: mtlopt.datasets.multidigits(n_train, args.n_test, tasks=T, seed=0) for T in task_sets
    }
    args_of = {T: program_args(datasets[T], cfg, seeds) for T in task_sets}
    jobs = [(T, None) for T in task_sets]
    jobs += [(T, m) for T in task_sets for m in methods if m.min_tasks <= T]

    def label(job):
        return f"T={job[0]} {'baselines' if job[1] is None else job[1].name}"

    # Compile every program first, --jobs at a time (XLA compiles one program on one core),
    # then train them one after the other, alone, so each training time is its own.
    compiled = {}
    with (
        ThreadPoolExecutor(max(1, args.jobs)) as pool,
        tqdm(total=len(jobs), desc="compiling", unit="program", dynamic_ncols=True) as bar,
    ):
        futures = {
            pool.submit(compile_one, m, datasets[T], cfg, args_of[T]): (T, m) for T, m in jobs
        }
        for future in as_completed(futures):
            compiled[futures[future]] = future.result()
            bar.set_postfix_str(label(futures[future]))
            bar.update()
    results: dict[int, list[Result]] = {T: [] for T in task_sets}
    with tqdm(jobs, desc="training", unit="run", dynamic_ncols=True) as bar:
        for job in bar:
            bar.set_postfix_str(label(job))
            T, m = job
            results[T].append(train_one(m, *compiled.pop(job), args_of[T]))
    wall = time.perf_counter() - started
    load_after = load()

    steps = epochs * (n_train // cfg.batch)
    lines = [
        "# MultiDigits: every method against single-task baselines",
        "",
        f"Command: `{command.strip()}`  ",
        f"Date: {date}  ",
        f"Machine: {machine()}  ",
        f"Versions: {versions()}, JAX backend {jax.default_backend()}  ",
        f"Wall time: {wall:.0f} s (data, compilation and training of every row)  ",
        f"Load (uptime's 1, 5, 15 min averages): before the run {load_before}; after {load_after} "
        "(a shared machine: other jobs ran beside this one, times are noisy)",
        "",
        f"Setup: {n_train} training pairs, {args.n_test} test pairs (digit images never seen in "
        f"training), MLP trunk {cfg.hidden} + one linear head per task (task-specific), "
        f"Adam lr {cfg.lr}, batch {cfg.batch}, {epochs} epochs = {steps} steps per seed, "
        f"seeds {seeds.tolist()} (all seeds of a row in one vmapped program). Metrics: test "
        "accuracy (%) or mean absolute error of the last step, mean ± std over seeds. "
        "Δm%: the mean over tasks of the relative difference to the single-task baselines, "
        "signed so that positive is better (LibMTL's sign; the Nash-MTL/FAMO code uses the "
        "opposite sign). compile s: tracing and XLA compilation of the row's program "
        f"({args.jobs} programs compiling at once, on {os.cpu_count()} cores); train s: its run "
        "(every seed, nothing else of this script running); ms/step: train s / steps (all "
        "seeds together).",
    ]
    for T in task_sets:
        data = datasets[T]
        lines += ["", f"## T = {T}: {', '.join(data.task_names)}", "", table(results[T], data)]
        skipped = [f"`{m.name}`" for m in methods if m.min_tasks > T]
        if skipped:
            lines += ["", f"Not run at T = {T}: {', '.join(skipped)} (needs more tasks)."]
    notes = [f"`{m.name}`: {m.note}" for m in methods if m.note]
    if notes:
        lines += ["", "Choices for required arguments: " + "; ".join(notes) + "."]
    compile_total = sum(r.compile_s for rs in results.values() for r in rs)
    train_total = sum(r.train_s for rs in results.values() for r in rs)
    lines += [
        "",
        f"Totals: compile {compile_total:.0f} s (summed over programs; {args.jobs} at once), "
        f"train {train_total:.0f} s, wall {wall:.0f} s.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "multidigits.md").write_text(report)
        summary = summarize(results, datasets)
        (out_dir / "multidigits.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot(summary, out_dir)
        print(f"wrote {out_dir}/multidigits.md, .json and multidigits_*.png")


if __name__ == "__main__":
    main()
