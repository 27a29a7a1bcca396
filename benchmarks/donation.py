"""Donation in a jitted update step: ms per step with and without ``donate_argnums``.

One step is ``tx.update(task_grads, opt_state, params, task_losses=...)`` and
``optax.apply_updates`` in one ``jax.jit``, ``tx = optax.chain(method, optax.adam(1e-3))``, on
one float32 ``(T, P)`` task-grads array (``aggregation.make_task_grads``), the new params and
state fed back into the next step, as a training loop does. Each method is compiled twice: with
params and optimizer state donated (``donate_argnums=(0, 1)``: XLA writes the new ones into
the old buffers) and without (every step allocates a fresh copy of both: for DB-MTL a T x P
EMA, for every method Adam's two P-sized moments and the params).

The two variants of every method run round-robin (a few consecutive steps each, the order
drawn afresh each round), so load from other processes hits them alike; the median ms per step
is reported. glibc's malloc policy decides what a fresh allocation costs (see README.md,
``train_step.py``): the full run times both policies, each in a child process of its own.

    python benchmarks/donation.py            # T=10, P=1e6, both malloc policies -> results/
    python benchmarks/donation.py --quick    # P=1e5, few steps, glibc defaults (CI, seconds)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

try:  # run from a checkout without `pip install -e .`
    import mtlopt
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mtlopt

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import MALLOC_MODES, cpu_name, make_task_grads, set_malloc

RESULTS = Path(__file__).resolve().parent / "results" / "donation.md"
METHODS = {
    "db_mtl(T)": lambda T: mtlopt.db_mtl(num_tasks=T),
    "mean()": lambda T: mtlopt.mean(),
    "cagrad()": lambda T: mtlopt.cagrad(),
}


def _step(tx):
    def step(params, opt_state, task_grads, losses):
        updates, opt_state = tx.update(task_grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state

    return step


def _memory(compiled, P: int) -> dict:
    """The compiled step's buffers in parameter copies (``P * 4`` bytes)."""
    try:
        m = compiled.memory_analysis()
        unit = 4 * P
        return {
            "out": m.output_size_in_bytes / unit,
            "alias": m.alias_size_in_bytes / unit,
            "temp": m.temp_size_in_bytes / unit,
        }
    except Exception:  # not every backend or version reports it
        return {}


class Variant:
    """One method, donated or not: its compiled step and the state it carries."""

    def __init__(self, name: str, donate: bool, T: int, P: int, J, losses):
        self.name, self.donate = name, donate
        tx = optax.chain(METHODS[name](T), optax.adam(1e-3))
        params = {"w": jnp.zeros((P,), jnp.float32) + 0.01}
        self.args = (J, losses)
        self.state = (params, tx.init(params))
        argnums = (0, 1) if donate else ()
        start = time.perf_counter()
        self.compiled = (
            jax.jit(_step(tx), donate_argnums=argnums).lower(*self.state, *self.args).compile()
        )
        self.compile_s = time.perf_counter() - start
        self.memory = _memory(self.compiled, P)
        self.times: list[float] = []

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self.state = self.compiled(*self.state, *self.args)
            jax.block_until_ready(self.state)
            if timed:
                self.times.append(time.perf_counter() - start)

    @property
    def ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    @property
    def iqr(self) -> tuple[float, float]:
        q = statistics.quantiles(self.times, n=4)
        return 1e3 * q[0], 1e3 * q[2]


def measure(T: int, P: int, rounds: int, block: int, methods: list[str], seed: int) -> dict:
    """Times every method with and without donation, round-robin; returns the results."""
    J, losses = make_task_grads(T, P, seed)
    J = {"w": jnp.asarray(J)}
    losses = jnp.asarray(losses)
    variants = [Variant(m, d, T, P, J, losses) for m in methods for d in (True, False)]
    for v in variants:
        v.run(2, timed=False)  # warm-up
    order = random.Random(seed)
    load0 = os.getloadavg()[0]
    for _ in range(rounds):
        for v in order.sample(variants, len(variants)):
            v.run(block)
    load1 = os.getloadavg()[0]
    rows = []
    for m in methods:
        on, off = (v for v in variants if v.name == m)
        rows.append(
            {
                "method": m,
                "donated_ms": on.ms,
                "not_donated_ms": off.ms,
                "donated_iqr": on.iqr,
                "not_donated_iqr": off.iqr,
                "steps": len(on.times),
                "memory_donated": on.memory,
                "memory_not_donated": off.memory,
                "compile_s": on.compile_s + off.compile_s,
            }
        )
    return {"rows": rows, "load": [load0, load1]}


def table(result: dict, malloc: str) -> str:
    lines = [
        f"**{malloc}.** Load average (1 min) before / after timing: "
        f"{result['load'][0]:.2f} / {result['load'][1]:.2f}.",
        "",
        "| method | donated ms | (p25-p75) | not donated ms | (p25-p75) | ratio "
        "| out / alias xP, donated | out / alias xP, not donated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mem = lambda m: f"{m['out']:.1f} / {m['alias']:.1f}" if m else "n/a"
        iqr = lambda q: f"{q[0]:.2f}-{q[1]:.2f}"
        lines.append(
            f"| `{r['method']}` | {r['donated_ms']:.2f} | {iqr(r['donated_iqr'])} | "
            f"{r['not_donated_ms']:.2f} | {iqr(r['not_donated_iqr'])} | "
            f"{r['not_donated_ms'] / r['donated_ms']:.2f}x | {mem(r['memory_donated'])} | "
            f"{mem(r['memory_not_donated'])} |"
        )
    return "\n".join(lines)


def header(T: int, P: int, rounds: int, block: int) -> str:
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("jax", "optax") if _has_dist(p)
    )
    return (
        f"mtlopt {mtlopt.__version__}, {versions} ({jax.default_backend()}), "
        f"{len(os.sched_getaffinity(0))} CPUs ({cpu_name()}), float32, T = {T}, P = {P:.0e}. "
        f"Step: `tx.update` + `optax.apply_updates` in one `jax.jit`, `tx = optax.chain(method, "
        f"optax.adam(1e-3))`; median of {rounds} rounds x {block} consecutive steps per "
        "variant (round-robin, random order each round), after 2 warm-up steps. `ratio`: not "
        "donated / donated; p25-p75: the middle half of the steps. `out / alias`: the compiled "
        "step's output buffers and those that "
        "reuse a donated input, in parameter copies (`P * 4` bytes)."
    )


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="P=1e5, few steps, no file (CI)")
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--P", type=float, default=1e6)
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 15; --quick 2)")
    p.add_argument("--block", type=int, default=3, help="consecutive steps per turn")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--malloc",
        choices=[*MALLOC_MODES, "both"],
        default=None,
        help="allocator policy (default: both, each in a child process; --quick: glibc)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (child mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help=f"default (full run): {RESULTS}")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    P = 100_000 if args.quick else int(args.P)
    rounds = args.rounds or (2 if args.quick else 15)
    malloc = args.malloc or ("glibc" if args.quick else "both")

    if malloc != "both":
        described = set_malloc(malloc)
        result = measure(args.T, P, rounds, args.block, args.methods, args.seed)
        if args.json:
            print(json.dumps({"malloc": described, **result}))
            return 0
        text = header(args.T, P, rounds, args.block) + "\n\n" + table(result, described)
        print(text)
        if args.out is not None:
            args.out.write_text("# Donation\n\n" + text + "\n")
        return 0

    parts = [header(args.T, P, rounds, args.block)]
    for mode in MALLOC_MODES:
        cmd = [sys.executable, __file__, "--malloc", mode, "--json", "--T", str(args.T)]
        cmd += ["--P", str(P), "--rounds", str(rounds), "--block", str(args.block)]
        cmd += ["--seed", str(args.seed), "--methods", *args.methods]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        parts.append(table(result, result["malloc"]))
        print(parts[-1] + "\n", flush=True)
    text = "\n\n".join(parts)
    out_path = args.out or RESULTS
    cmd = "python benchmarks/donation.py" + ("" if args.out is None else f" --out {args.out}")
    out_path.write_text(f"# Donation\n\n{text}\n\nWritten by `{cmd}`.\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
