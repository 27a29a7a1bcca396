"""Pass 2, ``sum_t w_t g_t``, and the non-finite guard after it: formulations side by side.

Every mtlopt method ends in ``tree.combine(w, task_grads)`` (per leaf ``w @ J``, J the
``(T, P_leaf)`` matrix), and ``mean()`` is that plus the non-finite guard. This script times, in
one process on one float32 ``(T, P)`` array, the ways to compute it:

* XLA: one dot (as before the kernel), an elementwise chain ``w[0] J[0] + w[1] J[1] + ...``,
  ``sum(w[:, None] * J, 0)``, the dot split into column halves (``--all``: 60-80 ms);
* the native kernel (``mtlopt/_src/csrc/kernels.cc``, MtloptCombine): ``w @ J`` and its
  finiteness check in one read, on XLA's thread pool;
* the guard: the old one (output, ``all_finite`` over it, ``lax.cond`` choosing the output or
  zeros) after the XLA dot and after the kernel, and the fused one (``tree.combine_checked``,
  then ``tree.fill_unless``: the kernel's check, an in-place fill that does nothing when the
  update is finite); ``mtlopt.mean()``'s jitted update as the library builds it;
* numpy ``w @ J``, torch ``w @ J`` and TorchJD's ``Mean`` (when installed).

    python benchmarks/pass2.py                    # T=10, P=1e6, glibc malloc as it is
    python benchmarks/pass2.py --malloc retain    # freed memory kept in the process
    python benchmarks/pass2.py --quick            # P=1e5, few calls (seconds)

Libraries run one after the other (JAX, numpy, torch), each group round-robin in a random order
per round (see aggregation.py); the median ms per call is printed, with its ratio to numpy's
``w @ J`` and to TorchJD's ``Mean`` of the same run. ``--out FILE`` appends the table to FILE.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aggregation as agg
import jax
import jax.numpy as jnp
from jax import lax

import mtlopt
from mtlopt._src import native, tree


def _xla_dot(w, m):
    return tree._combine_xla(w, m)


def _chain(w, m):
    acc = w[0] * m[0]
    for t in range(1, m.shape[0]):
        acc = acc + w[t] * m[t]
    return acc


def _sum_axis(w, m):
    return jnp.sum(w[:, None] * m, axis=0)


def _halves(w, m):
    h = m.shape[1] // 2
    return jnp.concatenate([_xla_dot(w, m[:, :h]), _xla_dot(w, m[:, h:])])


def _kernel(w, m):
    return native.combine_call(m, w)[0]


def _kernel_checked(w, m):
    return native.combine_call(m, w)


def _old_guard(combine):
    """The guard as build.py had it: output, all_finite over it, a cond (copy) choosing it."""

    def fn(w, m):
        out = combine(w, m)
        ok = jnp.all(jnp.isfinite(w)) & tree.all_finite(out)
        return lax.cond(ok, lambda: out, lambda: jnp.zeros_like(out))

    return fn


def _fused_guard(w, m):
    """combine_checked on the kernel, then fill_unless: its check, an in-place fill (no pass)."""
    (out,), ok = tree.combine_checked(w, [m], use_native=True)
    ok &= jnp.all(jnp.isfinite(w))
    return tree.fill_unless(ok, [out], 0.0)[0]


def _chain_guard_cond(w, m):
    out = _chain(w, m)
    ok = jnp.all(jnp.isfinite(w)) & tree.all_finite(out)
    return lax.cond(ok, lambda: out, lambda: jnp.zeros_like(out))


def _chain_guard_fill(w, m):
    out = _chain(w, m)
    ok = jnp.all(jnp.isfinite(w)) & tree.all_finite(out)
    return tree.fill_unless(ok, [out], 0.0)[0]


def _dot_guard_fill(w, m):
    out = _xla_dot(w, m)
    ok = jnp.all(jnp.isfinite(w)) & tree.all_finite(out)
    return tree.fill_unless(ok, [out], 0.0)[0]


def jax_benches(J: np.ndarray, include_slow: bool) -> list[agg.Bench]:
    T, P = J.shape
    m = jnp.asarray(J)
    w = jnp.full((T,), 1.0 / T, jnp.float32)
    cases = {
        "XLA dot (before)": _xla_dot,
        "XLA elementwise chain": _chain,
        "XLA sum(w[:, None] * J, 0)": _sum_axis,
    }
    if include_slow:
        cases["XLA dot on column halves"] = _halves
    if native.available():
        cases["kernel w @ J"] = _kernel
        cases["kernel w @ J + check"] = _kernel_checked
        cases["guard: kernel + all_finite + cond"] = _old_guard(_kernel)
        cases["guard: combine_checked + fill_unless"] = _fused_guard
    cases["guard: XLA dot + all_finite + cond"] = _old_guard(_xla_dot)
    cases["guard: XLA chain + all_finite + cond"] = _chain_guard_cond
    if native.available():
        cases["guard: XLA chain + all_finite + fill_unless"] = _chain_guard_fill
        cases["guard: XLA dot + all_finite + fill_unless"] = _dot_guard_fill
    benches = []
    for name, fn in cases.items():
        compiled = jax.jit(fn).lower(w, m).compile()

        def call(compiled=compiled):
            jax.block_until_ready(compiled(w, m))

        benches.append(agg.Bench(name, call))
    # mtlopt.mean() as the library builds it (state fed back, as aggregation.py times it); and
    # with the kernel off (MTLOPT_NATIVE=0 is read at trace time), the XLA dot inside.
    for name, env in (("mtlopt.mean()", None), ("mtlopt.mean(), MTLOPT_NATIVE=0", "0")):
        old = os.environ.get(native.NATIVE_ENV)
        if env is not None:
            os.environ[native.NATIVE_ENV] = env
        try:
            spec = agg.Spec(name, name, lambda T: mtlopt.mean(), "Mean")
            bench = agg.method_bench(spec, m, jnp.zeros((P,)), jnp.ones((T,)), T)
        finally:
            if old is None:
                os.environ.pop(native.NATIVE_ENV, None)
            else:
                os.environ[native.NATIVE_ENV] = old
        benches.append(bench)
    return benches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--P", type=float, default=1e6)
    p.add_argument("--repeats", type=int, default=41)
    p.add_argument("--quick", action="store_true", help="P=1e5, 5 calls each")
    p.add_argument("--all", action="store_true", help="also the slow forms (column halves)")
    p.add_argument("--malloc", choices=agg.MALLOC_MODES, default="glibc")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = p.parse_args(argv)
    malloc = agg.set_malloc(args.malloc)
    T, P = args.T, int(1e5 if args.quick else args.P)
    repeats = 5 if args.quick else args.repeats
    J, _ = agg.make_task_grads(T, P)
    groups = [jax_benches(J, args.all)]
    w_np = np.full((T,), 1.0 / T, np.float32)
    groups.append([agg.Bench("numpy w @ J", lambda: w_np @ J)])
    torch, tjd = (None, None) if args.no_torch else agg.load_torch(args.threads)
    if torch is not None:
        tJ = torch.from_numpy(J)
        tw = torch.from_numpy(w_np)
        mean = tjd.Mean()

        def tjd_mean():
            with torch.no_grad():
                mean(tJ)

        groups.append(
            [agg.Bench("torch w @ J", lambda: tw @ tJ), agg.Bench("TorchJD Mean", tjd_mean)]
        )
    agg.run_groups(groups, repeats)
    by = {b.name: b.ms for g in groups for b in g}
    np_ms, tjd_ms = by["numpy w @ J"], by.get("TorchJD Mean")
    lines = [
        f"mtlopt {mtlopt.__version__}, jax {jax.__version__}, T={T}, P={P:.0e} float32, median of "
        f"{repeats} calls, {agg.cpu_name()}, {malloc}, native kernel: "
        f"{native.available()}" + (f", torch {torch.__version__}" if torch is not None else ""),
        f"{'formulation':<40}{'ms':>8}{'x numpy':>9}{'x TorchJD Mean':>16}",
    ]
    for g in groups:
        for b in g:
            vs_tjd = f"{b.ms / tjd_ms:.2f}" if tjd_ms else "n/a"
            lines.append(f"{b.name:<40}{b.ms:>8.2f}{b.ms / np_ms:>9.2f}{vs_tjd:>16}")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
