"""Every per-row scenario of the contract and degenerate suites, from three compiled programs.

For a registry row, :func:`results` (cached per row and process) builds:

* ``plain``: the row's jitted update as users run it (``registry.cached(row, T)``), called on
  the task grads as ONE leaf of SIZE columns, without a mask, once per scenario that has every
  task present. Compared with ``main`` below (a pytree of four leaves, vmapped, with an
  all-True mask), it checks split invariance, vmap and the mask path at once;
* ``main``: ``jax.vmap`` of the update over every scenario of :func:`scenarios` (random,
  conflicting, zero, tiny, huge, NaN/inf, masked tasks with NaN rows, all masked, one task
  left, permuted, identical, opposite, mixed norms, bad losses, rotated, ...), each with its
  own start state (the initial one, or the one after a first step: ``main`` is run once on
  the base problem for it), losses and task mask, under ``jax.vjp`` in a common scale ``s`` of
  the task grads (the gradient check);
* ``side``: one jitted program holding the rest, each part traced on its own so that a part
  that fails to trace fails only the tests that read it:

  - ``t2``: the method on two tasks, built without ``num_tasks`` where it may be, on the
    problems that the masked scenarios reduce to, on two opposite tasks, and on the float32
    values of the low-precision run;
  - ``t64``: 64 rank-deficient tasks;
  - ``lowp``: ``nonfinite="propagate"`` on a tree of bfloat16 and float16 leaves (two tasks:
    the leaf dtypes are the skeleton's business, and two-task methods often take a closed
    form, cheap to compile), vmapped over a good step and a NaN step.

The tests then check each property on the host from these arrays. Each of these programs
holds one copy of the method's graph (its solver included): XLA's compile time grows with the
copies, so new checks go into a scenario of ``main`` where they can.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import mtlopt
from tests import inputs
from tests.registry import Row, cached

T = 3
BASE = inputs.random_matrix(T, seed=4)  # conflicting: task 1 leans against task 0
LOSSES = np.asarray(inputs.losses(T), np.float32)
SCALES = (0.0, 1e-30, 1e-20, 1e20, 1e30)
BAD = (np.nan, np.inf, -np.inf)
PERM = np.array([2, 0, 1])
LOWP_J = inputs.random_matrix(2, seed=5)
# Low-precision leaves in one tree: float32 reductions, each leaf's dtype out.
LOWP_DTYPES = {"a": jnp.bfloat16, "b": jnp.float16, "c": {"d": jnp.bfloat16, "e": jnp.float16}}


@dataclasses.dataclass
class Scenario:
    name: str
    J: np.ndarray  # (T, SIZE) float32, rows = tasks
    losses: np.ndarray  # (T,) float32
    mask: np.ndarray  # (T,) bool
    start: str = "init"  # "init": tx.init's state; "step1": after one step on BASE

    @property
    def full(self) -> bool:
        return bool(self.mask.all())


def _rows_nan(J, losses, rows):
    J, losses = J.copy(), losses.copy()
    J[rows] = np.nan
    losses[rows] = np.nan
    return J, losses


def lowp_params():
    return jax.tree.map(lambda x, d: x.astype(d), inputs.params(), LOWP_DTYPES)


def lowp_grads(J):
    return jax.tree.map(lambda x, d: x.astype(d), inputs.from_matrix(J), LOWP_DTYPES)


def round_lowp(J):
    """J rounded, leaf by leaf, to the dtypes of LOWP_DTYPES (the float32 reference)."""
    as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), lowp_grads(J))
    return np.asarray(inputs.to_matrix(as_f32))


def scenarios(row: Row) -> list[Scenario]:
    ones = np.ones(T, bool)
    L = LOSSES
    out = [Scenario("random", BASE, L, ones), Scenario("random_step1", BASE, L, ones, "step1")]
    for s in SCALES:
        out.append(Scenario(f"scale_{s:g}", BASE * np.float32(s), L, ones))
    for bad in BAD:
        J = BASE.copy()
        J[1, 3] = bad
        out.append(Scenario(f"bad_{bad}", J, L, ones, "step1"))
    if row.needs_losses:
        out.append(Scenario("nan_loss", BASE, L.copy(), ones, "step1"))
        out[-1].losses[1] = np.nan
        out.append(Scenario("losses_out_of_domain", BASE, np.array([-1, 0, 2], np.float32), ones))
    for k in range(T):
        mask = ones.copy()
        mask[k] = False
        out.append(Scenario(f"mask_{k}", *_rows_nan(BASE, L, [k]), mask))
    mask = np.array([True, False, True])
    out.append(Scenario("mask_1_step1", *_rows_nan(BASE, L, [1]), mask, "step1"))
    out.append(Scenario("all_masked", *_rows_nan(BASE, L, [1]), np.zeros(T, bool), "step1"))
    out.append(Scenario("one_task", *_rows_nan(BASE, L, [1, 2]), np.array([True, False, False])))
    out.append(Scenario("permuted", BASE[PERM], L[PERM], ones))
    rng = np.random.default_rng(0)
    g = rng.normal(size=inputs.SIZE).astype(np.float32)
    out.append(Scenario("identical", np.stack([g] * T), np.ones(T, np.float32), ones))
    J, losses = _rows_nan(np.stack([g, -g, g]), np.ones(T, np.float32), [2])
    out.append(Scenario("opposite", J, losses, np.array([True, True, False])))
    J = np.random.default_rng(2).normal(size=(T, inputs.SIZE)).astype(np.float32)
    J[1] = 0.0
    out.append(Scenario("one_zero", J, L, ones))
    for name, scales in (("norms_20", (1e-20, 1.0, 1e20)), ("norms_10", (1e-10, 1.0, 1e10))):
        J = np.random.default_rng(5).normal(size=(T, inputs.SIZE)) * np.asarray(scales)[:, None]
        out.append(Scenario(name, J.astype(np.float32), L, ones))
    Q, _ = np.linalg.qr(np.random.default_rng(9).normal(size=(inputs.SIZE, inputs.SIZE)))
    out.append(Scenario("rotated", (BASE.astype(np.float64) @ Q).astype(np.float32), L, ones))
    return out


# The two-task problems: what mask_0, mask_1, mask_2 reduce to (the tasks they keep), then
# two opposite tasks and the float32 reference of the low-precision run (T2_ROWS names them).
T2 = {f"mask_{k}": [i for i in range(T) if i != k] for k in range(T)}
T2_ROWS = [*T2, "opposite", "lowp_ref"]


def _stack(trees):
    """Stacked on the host (eager jnp ops would compile one program per shape)."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def to_host(tree):
    """numpy copies of a tree's arrays (PRNG key arrays stay as they are): indexing them on the
    host compiles nothing."""

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        return np.asarray(x)

    return jax.tree.map(one, tree)


def flat_rows(tree) -> np.ndarray:
    """A batched pytree (leading batch axis) as a (batch, n) float64 matrix."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate(
        [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1
    )


def extra(row: Row, losses, mask=None):
    out = {"task_losses": losses} if row.needs_losses else {}
    out.update(dict(row.signals))
    if mask is not None:
        out["task_mask"] = mask
    return out


def leaf(J):
    """Task grads as one leaf (the ``plain`` program's structure)."""
    return {"all": jnp.asarray(J)}


LEAF_PARAMS = {"all": jnp.zeros(inputs.SIZE)}


class Failed:
    """A part of the side program that raised while tracing; ``.get`` re-raises it."""

    def __init__(self, error):
        self.error = error


def get(part):
    if isinstance(part, Failed):
        raise part.error
    return part


@dataclasses.dataclass
class Results:
    row: Row
    scen: list[Scenario]
    index: dict[str, int]
    s0: object  # main's initial state (pytree structure)
    s1: object  # main's state after one step on BASE
    main_u: np.ndarray  # (S, n) updates
    main_state: object  # batched states
    main_start: object  # batched start states
    main_ds: np.ndarray  # (S,) d/ds sum(update(s J)) at s = 1
    plain: dict  # name -> (update (n,), state, start state): one leaf, no mask, unbatched
    side: dict  # "t2": (u, states) batched as T2_ROWS; "t64": (u, state); "lowp": (u, s) x 2
    # and the initial state

    def u(self, name):
        return self.main_u[self.index[name]]

    def state(self, name):
        return index(self.main_state, self.index[name])

    def start(self, name):
        return index(self.main_start, self.index[name])

    def weights(self, name):
        w = mtlopt.task_weights(self.state(name))
        return None if w is None else np.asarray(w, np.float64)


def t2_make(row: Row):
    """The two-task transformation: without num_tasks where the method allows it."""
    return row.make(2) if row.needs_num_tasks else row.make(2, num_tasks=None)


def _guard(fn):
    try:
        return fn()
    except Exception as e:  # a trace-time error: reported by the tests that read this part
        return Failed(e)


@functools.cache
def results(row: Row) -> Results:
    tx, plain = cached(row, T)
    params = inputs.params()
    scen = scenarios(row)
    idx = {s.name: i for i, s in enumerate(scen)}
    S = len(scen)

    def one(J, state, losses, mask):
        def f(s):
            return tx.update(inputs.from_matrix(J * s), state, params, **extra(row, losses, mask))

        u, vjp, new = jax.vjp(f, jnp.float32(1.0), has_aux=True)
        (ds,) = vjp(jax.tree.map(jnp.ones_like, u))
        return u, new, ds

    main = jax.jit(jax.vmap(one))
    Ls = np.stack([s.losses for s in scen])
    Ms = np.stack([s.mask for s in scen])
    s0 = to_host(tx.init(params))
    # A first call on the base problem gives the state after one step.
    _, first, _ = main(np.stack([BASE] * S), _stack([s0] * S), np.stack([LOSSES] * S),
                       np.ones((S, T), bool))  # fmt: skip
    s1 = index(to_host(first), 0)
    starts = _stack([s0 if s.start == "init" else s1 for s in scen])
    main_u, main_state, main_ds = to_host(main(np.stack([s.J for s in scen]), starts, Ls, Ms))

    leaf_s0 = tx.init(LEAF_PARAMS)
    leaf_s1 = plain(leaf(BASE), leaf_s0, LEAF_PARAMS, **extra(row, jnp.asarray(LOSSES)))[1]
    plain_out = {}
    for s in scen:
        if s.full:
            start = leaf_s0 if s.start == "init" else leaf_s1
            u, new = plain(leaf(s.J), start, LEAF_PARAMS, **extra(row, jnp.asarray(s.losses)))
            u = np.asarray(u["all"], np.float64).reshape(-1)
            plain_out[s.name] = (u, to_host(new), to_host(start))

    tx2, tx64 = t2_make(row), row.make(64)
    tx_p = row.make(2, nonfinite="propagate")
    rng = np.random.default_rng(3)
    t64_J = (rng.normal(size=(64, 3)) @ rng.normal(size=(3, inputs.SIZE))).astype(np.float32)
    t2_J = [BASE[keep] for keep in T2.values()]
    t2_J += [scen[idx["opposite"]].J[:2], round_lowp(LOWP_J)]
    t2_L = [LOSSES[keep] for keep in T2.values()] + [np.ones(2, np.float32), LOSSES[:2]]
    lowp_bad = LOWP_J.copy()
    lowp_bad[0, 0] = np.nan

    def side(t2_J, t2_L, t64_J, lowp_J, L):
        def t2():
            def f(J, losses):
                state = tx2.init(params)
                return tx2.update(inputs.from_matrix(J), state, params, **extra(row, losses))

            return jax.vmap(f)(t2_J, t2_L)

        def t64():
            state = tx64.init(params)
            return tx64.update(inputs.from_matrix(t64_J), state, params, **extra(row, jnp.ones(64)))

        def lowp():
            lp = lowp_params()
            state = tx_p.init(lp)
            f = lambda J: tx_p.update(lowp_grads(J), state, lp, **extra(row, L))
            return (*jax.vmap(f)(lowp_J), state)

        return {"t2": _guard(t2), "t64": _guard(t64), "lowp": _guard(lowp)}

    # Failed parts are not arrays: keep them out of the jitted outputs.
    failed = {}

    def side_arrays(*args):
        out = side(*args)
        for k, v in list(out.items()):
            if isinstance(v, Failed):
                failed[k] = v
                out[k] = None
        return out

    side_out = jax.jit(side_arrays)(
        jnp.asarray(np.stack(t2_J)), jnp.asarray(np.stack(t2_L)), jnp.asarray(t64_J),
        jnp.asarray(np.stack([LOWP_J, lowp_bad])), jnp.asarray(LOSSES[:2]),
    )  # fmt: skip
    side_out = to_host(side_out)
    side_out.update(failed)
    return Results(
        row=row,
        scen=scen,
        index=idx,
        s0=s0,
        s1=s1,
        main_u=flat_rows(main_u),
        main_state=main_state,
        main_start=starts,
        main_ds=np.asarray(main_ds, np.float64),
        plain=plain_out,
        side=side_out,
    )


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def close(a, b, rtol=1e-4, atol=1e-5, err_msg=""):
    """allclose with the absolute tolerance relative to the larger magnitude of the two."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b), initial=0.0), np.max(np.abs(a), initial=0.0), 1e-300)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        scale = 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, equal_nan=True, err_msg=err_msg)
