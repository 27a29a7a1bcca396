"""The one init/update skeleton that every method shares.

A method supplies a :class:`Method`: the extra state it keeps and a pure function from a
:class:`Context` (the small Gramian, the losses, the task mask, the state, ...) to its weights.
The skeleton does everything else once, for all methods: the checks, the task-specific heads,
the task mask, the passes over the task grads and the non-finite policy.

Developer notes: the hooks
==========================

Every field of :class:`Method` past the first three has a default, so a method sets only what it
uses. One update runs in this order (``update_fn`` below):

1. **Checks, at trace time.** T (from the task grads, ``num_tasks``, or the losses in loss-only
   mode), ``task_losses`` (``needs_losses``), ``task_mask``, and the method's declared extra
   signals (``signals``: each a :class:`Signal` with a name, a kind and whether it is required;
   the skeleton checks its shape and dtype and puts it in ``ctx.signals``; undeclared extra
   arguments are ignored, as optax chains pass every extra argument to every link).
2. **Split.** ``task_specific=`` (a bool pytree, or a callable that is always handed a
   params-shaped tree of ``jax.ShapeDtypeStruct``, in ``init`` and in ``update`` alike) separates
   the heads; ``groups=`` (``"leaf"``, a pytree of group ids, or a callable like
   ``task_specific``'s) splits the shared leaves into K static groups. Masked tasks' rows are
   zeroed (their NaNs cannot leak into a sum).
3. **Inputs' finiteness** (``ctx.ok``): the active losses, the incoming scales, the signals.
4. **Randomness** (``random=True``): the state holds raw key data in ``key``; each step the
   skeleton splits it, hands a fresh key in ``ctx.key`` (under ``groups=`` one per group) and
   stores the other half. A skipped step keeps the old key.
5. **State written before the weighting** (``prepare``): ``(shared grads, ctx) -> Prepared``
   replaces the shared task grads (DB-MTL: its EMA) and returns state fields written now, its
   own ``ok`` (it must not write on ``ctx.ok == False``: a step skipped for bad inputs leaves
   every float of the state as it was), and optionally per-task scalars computed in the same
   pass (the squared norms, handed on as the ``"diag"`` Gramian). ``guarded`` names the fields it
   keeps itself, so the skeleton does not select them again (a T x P select is a pass and a
   copy). The weighting then sees the state after that step (``ctx.state``).
6. **Pass 1** (``gram="full"``: the ``(T, T)`` Gramian, ``"diag"``: squared norms, ``None``):
   with ``groups=``, one per group, stacked ``(K, T, T)``; with ``gram_leaves``, over the
   chosen shared leaves only (GradNorm's last shared layer). Pre-scaled by a power of two when
   float32 over- or underflows (``ctx.gram_scale``: the true Gramian is
   ``gram * gram_scale**2``). Float64 leaves (``jax_enable_x64``) are reduced in float64, others
   in float32 (``ctx.dtype``).
7. **Per-task scales folded in.** A task transform in front (``log_transform``) hands its
   ``(T,)`` scales in a :class:`~mtlopt.TaskScaled`; a method's own ``scales(ctx) -> (T,)``
   (MGDA's normalisation, later UW's ``exp(-s)``) is called after pass 1. Both are applied to the
   Gramian as ``S G S`` (exactly, by powers of two, without over- or underflow) and to the
   weights as ``S w``: never as a new T x P array.
8. **Weighting**: ``weights_fn(ctx) -> (w, state fields)``. With ``groups=`` it runs batched
   over the K groups (``jax.vmap``: one solve for all), with the ``per_group`` state fields (and
   ``weights``) carrying a leading K axis; it then returns ``(K, T)`` weights. ``task_weights``
   reports ``S_method * w``, the coefficients on the task grads the aggregator received.
9. **Heads**: each head leaf follows its own task's gradient times ``head_scales(ctx, w)``
   (default 1; loss-weighting methods give heads the same loss weights as the trunk, so the
   one-backward-pass mode and the task-grads mode agree), times the incoming scales.
10. **Pass 2**: ``sum_t w_t g_t`` per leaf (each leaf with its group's weights), or, for
    per-coordinate methods (``coordinate(ctx, matrix, leaf_index) -> (C,)``, replacing the
    weighted sum for shared leaves: TrimmedMean, GradDrop), a function of the T values of each
    coordinate. Per-coordinate methods have no ``(T,)`` weights: ``task_weights`` returns None.
11. **Non-finite policy** (``nonfinite=``): a step whose inputs, weights or update are not
    finite leaves the state as it was (every float, the key included), counts the step in
    ``skipped``, and gives zeros (``"skip"``) or NaN (``"propagate"``). A finite Gramian proves
    its grads finite, so Gramian methods decide before pass 2 and never re-read the update.
    The new state is cast to the old state's dtypes (a state is stable under ``lax.scan``).

**Periodic weights** (``refresh_every``, Nash-MTL's ``update_weights_every``): steps 6-8 run
under a ``lax.cond`` on ``state.count % refresh_every == 0``; between refreshes the weights come
from ``reuse`` and the non-finite policy checks the update (no Gramian proves the grads finite).
**Clipping** (``max_norm``): after step 8, the weights are scaled so that the shared update's
norm, known from the Gramian, is at most ``max_norm`` (between refreshes: from the update).

**Weight modifiers** (``MODIFY``, a private extra argument that :mod:`modifiers` passes down,
through chains and other wrappers, to the one aggregator inside): ``"refresh_every"`` replaces
``Method.refresh_every`` (periodic weights for any method with weights), and ``"smooth"``, a
function ``(w, mask) -> w'`` (CR-MOGM's moving average), is applied to the weights after the
weighting (and a Gramian ``max_norm`` clip), before the finiteness check, the heads and
pass 2, so the update, the heads, the stored ``weights`` and the reuse between refreshes all
see the modified weights. The skeleton writes ``"consumed"`` (a count) and ``"ok"`` (whether the
step was taken) back into the dict; per-coordinate methods and methods without stored weights
refuse it.

**Two independent samples** (``cross``: SDMGrad, MoDo): the method declares an optional
``"task_grads"`` :class:`Signal` (a second, independent sample of the task grads, with the
structure of the first) and names it in ``Method.cross``. Where a call passes it, pass 1
computes the cross-Gramian ``A = J J2^T`` (``A[s, t] = <g_s, g2_t>``) of the main task grads
with it instead of the Gramian, over the same shared leaves (heads excluded, masked rows of
both zeroed, per group under ``groups=``), pre-scaled by one power of two for both samples
where float32 over- or underflows (true ``A = ctx.gram * ctx.gram_scale**2``; incoming task
scales are folded in as ``S A S``), and hands it in ``ctx.gram``: not symmetric, not
positive semi-definite. The second sample is not checked for finiteness by a pass of its own: a
finite ``A`` proves both samples' active rows finite. Pass 2 combines the main task grads only.
Without the signal ``ctx.gram`` is the Gramian, as for any method (the single-sample form);
``ctx.signals[name] is None`` tells the two apart at trace time. Not with ``prepare``,
``gram_leaves`` or ``max_norm``.

**Loss-only mode** (``loss_weighting=True``: mean, linear, DWA, UW, RLW, FAMO, GLS, ...; built
with :func:`loss_weighting`, which also gives heads the same weights): the weights depend only
on the losses (and the state, the signals), so ``update(None, state, task_losses=...)`` returns
``(weights, new_state)`` without task grads: :func:`mtlopt.loss_weights`. The user
differentiates ``sum_t w_t l_t`` once instead of running T backward passes; the same method
over task grads gives the same update (``tests/test_one_pass.py``, every such row). Learned
per-task parameters (UW's log-variances, FAMO's logits) are stepped by an optax optimizer inside
the weighting: ``mtlopt/_src/learned.py``.

**Task transforms** (:func:`task_transform`): task grads in, task grads out, with the same
checks, mask and non-finite handling; they return a lazy :class:`~mtlopt.TaskScaled`.

**T x P state**: :func:`mtlopt._src.tree.task_zeros` builds a params-shaped tree with a leading
task axis (``None`` at heads: ``init_extra`` receives the params with heads replaced by None),
sharded like the params, float32 for narrower floats; writes go through
:func:`~mtlopt._src.tree.saturate` so an EMA never overflows to inf.

**Sampling before the backward pass** (CAGrad-Fast's groups) lives in ``sampling.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mtlopt._src import checks, rng, tree

# Take the pre-scaled path when the Gramian's largest diagonal entry is not finite (overflow) or
# below this (underflow to zero or to subnormals that the CPU flushes).
_TINY_GRAM = 1e-30

NONFINITE = ("skip", "propagate")
# The private extra argument through which mtlopt.with_diagnostics asks an aggregator for the
# Gramian of the task grads it received: a dict that update_fn fills at trace time.
CAPTURE = "_mtlopt_diagnostics"
# The private extra argument through which the weight modifiers (mtlopt.smooth_weights,
# mtlopt.refresh_weights: mtlopt/_src/modifiers.py) reach the aggregator they wrap: a dict,
# read and filled at trace time (see "Weight modifiers" in the module notes).
MODIFY = "_mtlopt_weights"

SIGNAL_KINDS = ("flag", "task_vector", "gramian", "task_grads")


class Signal(NamedTuple):
    """An extra argument a method reads from ``update(..., name=value)``.

    Kinds: ``"flag"`` (a bool scalar, e.g. an epoch boundary), ``"task_vector"`` (``(T,)``
    float, e.g. the losses after the step), ``"gramian"`` (``(T, T)``, e.g. the cross-Gramian
    ``J1 J2^T`` of two independent samples), ``"task_grads"`` (a second sample of task grads,
    with the structure and shapes of the first).
    """

    name: str
    kind: str
    required: bool = True
    why: str = ""


class Context(NamedTuple):
    """What a method's hooks see (all small arrays, except in ``prepare`` and ``coordinate``)."""

    # gram, losses and key are arrays for the hooks that read them (a method that declares a
    # Gramian, needs_losses or random=True) and None otherwise: typed Any, so that those hooks
    # need no None checks.
    T: int  # static number of tasks
    gram: Any  # (T, T) or (T,); the true one is gram * gram_scale**2; None before pass 1
    gram_scale: jax.Array  # scalar, 1 unless pass 1 (or a fold) had to pre-scale
    losses: Any  # (T,), or None where not required and not given
    mask: jax.Array  # (T,) bool, True for the tasks that take part
    state: Any  # the method's state (after ``prepare``'s writes, from step 8 on)
    key: Any = None  # a fresh PRNG key (``random=True``)
    signals: Any = None  # dict: the declared extra signals (None where optional and absent)
    scales: jax.Array | None = None  # incoming per-task scales (``prepare`` applies them)
    ok: Any = True  # scalar bool: the inputs are finite (``prepare`` must not write otherwise)
    dtype: Any = jnp.float32  # the reductions' dtype (float64 for float64 leaves)
    group: jax.Array | None = None  # the group's index under ``groups=``


class Prepared(NamedTuple):
    """What ``prepare`` returns (see the module notes, step 5)."""

    grads: list  # the shared task grads that passes 1 and 2 read, one (T, ...) array a leaf
    state: dict  # state fields written in this pass
    ok: jax.Array  # scalar bool
    gram: jax.Array | None = None  # per-task scalars of the same pass: the squared norms


class Method(NamedTuple):
    """What a method adds to the skeleton (see the module notes for the order of the hooks).

    Attributes:
      name: the public name, used in every error message.
      state_cls: a NamedTuple with fields ``count``, ``skipped``, ``weights`` (aggregators),
        ``key`` (``random``) and the method's own.
      weights_fn: ``(Context) -> (weights, extras)``: ``(T,)`` weights on the (folded) task grads
        and a dict of updated state fields; None for per-coordinate methods.
      init_extra: ``(num_tasks, shared_params) -> dict`` of the method's own state fields;
        ``shared_params`` is the params pytree with task-specific leaves replaced by None (feed
        it to ``tree.task_zeros`` for a T x P state). Every call must build new arrays (a state
        donated to a jitted step deletes its buffers).
      gram: ``"full"`` (the Gramian), ``"diag"`` (squared norms only) or ``None``.
      needs_losses: whether ``task_losses`` is required.
      prepare: ``(shared task grads, Context) -> Prepared``, run before pass 1.
      head_scales: ``(Context, weights) -> (T,)``: the factor on each task's head gradient.
      guarded: state fields that ``prepare`` keeps unchanged itself on a bad step.
      scales: ``(Context) -> (T,)`` per-task scales folded into the Gramian after pass 1.
      coordinate: ``(Context, matrix (T, C), leaf index) -> (C,)``: pass 2 per coordinate.
      loss_weighting: the weights need only the losses (and state, signals): the loss-only
        mode is allowed and heads get the weights.
      signals: the extra arguments the method reads (:class:`Signal`).
      random: the state keeps a PRNG key; ``ctx.key`` is fresh every step.
      per_group: state fields that get a leading group axis under ``groups=``.
      refresh_every: the weighting (pass 1 and ``weights_fn``) runs on the steps where
        ``state.count % refresh_every == 0``; the steps in between skip the Gramian pass and
        the solve and take their weights from ``reuse`` (an int, or a traced one).
      reuse: ``(Context) -> (weights, extras)`` on the steps in between (``ctx.gram`` is None);
        default: the stored ``state.weights`` (which needs ``num_tasks``).
      max_norm: the shared part of the update is scaled down to at most this norm (heads are
        not): from ``w^T G w`` where the Gramian is known (no pass), from the update itself on
        the in-between steps of ``refresh_every`` (a read and a write of a P-sized array). The
        reported weights include the factor. None or 0: no clip.
      gram_leaves: ``(argument name, spec)``: pass 1 reads only the shared leaves that ``spec``
        (a bool pytree or a callable, as ``task_specific``) marks True, e.g. GradNorm's last
        shared layer; pass 2 still combines every leaf, and the update is then checked for
        finiteness (the Gramian vouches only for the leaves it read). Not with ``groups=``.
      cross: the name of a declared optional ``"task_grads"`` signal (a second independent
        sample): where it is passed, ``ctx.gram`` is the cross-Gramian of the main task grads
        with it (see the module notes, "Two independent samples").
    """

    name: str
    state_cls: type[Any]  # a NamedTuple class
    weights_fn: Callable[[Context], tuple[jax.Array, dict]] | None
    # (T: num_tasks, None where not given: a method whose state needs T requires it)
    init_extra: Callable[[Any, Any], dict] = lambda T, shared: {}
    gram: str | None = "full"
    needs_losses: bool = False
    prepare: Callable[[list, Context], Prepared] | None = None
    head_scales: Callable[[Context, jax.Array], jax.Array] | None = None
    guarded: tuple[str, ...] = ()
    scales: Callable[[Context], jax.Array] | None = None
    coordinate: Callable[[Context, jax.Array, int], jax.Array] | None = None
    loss_weighting: bool = False
    signals: tuple[Signal, ...] = ()
    random: bool = False
    per_group: tuple[str, ...] = ()
    refresh_every: Any = 1
    reuse: Callable[[Context], tuple[jax.Array, dict]] | None = None
    max_norm: Any = None
    gram_leaves: tuple[str, Any] | None = None
    cross: str | None = None


# ---------------------------------------------------------------------------------------------
# Static structure: heads and groups


def _structs(tree_: Any, task_axis: bool) -> Any:
    """A params-shaped tree of ShapeDtypeStructs (what ``task_specific``/``groups`` callables
    see, in ``init`` and ``update`` alike)."""

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        shape = jnp.shape(x)[1:] if task_axis else jnp.shape(x)
        return jax.ShapeDtypeStruct(shape, jnp.result_type(x))

    return jax.tree.map(leaf, tree_)


def _flags(name: str, arg: str, spec: Any, structs: Any, treedef: Any, what: str) -> list:
    if callable(spec):
        spec = spec(structs)
    try:
        return treedef.flatten_up_to(spec)
    except (ValueError, TypeError) as e:
        raise checks.fail(
            name,
            f"{arg} must be a pytree of {what} with the structure of the params (or a callable "
            f"returning one); its structure does not match the task grads: {e}",
        ) from None


class _Layout(NamedTuple):
    treedef: Any
    heads: list[bool]  # per leaf
    group: list[int]  # per shared leaf
    K: int | None  # number of groups, None without groups=


def _layout(name: str, task_specific: Any, groups: Any, tree_: Any, task_axis: bool) -> _Layout:
    leaves, treedef = jax.tree.flatten(tree_)
    structs = _structs(tree_, task_axis)
    heads = [False] * len(leaves)
    if task_specific is not None:
        heads = [
            bool(f) for f in _flags(name, "task_specific", task_specific, structs, treedef, "bools")
        ]
    n_shared = heads.count(False)
    if groups is None:
        return _Layout(treedef, heads, [0] * n_shared, None)
    if isinstance(groups, str):
        if groups != "leaf":
            raise checks.fail(
                name, f"groups must be 'leaf', a pytree or a callable; got {groups!r}."
            )
        ids = list(range(n_shared))
    else:
        all_ids = _flags(name, "groups", groups, structs, treedef, "group ids")
        ids = [g for g, h in zip(all_ids, heads, strict=True) if not h]
        for g in ids:
            if not isinstance(g, Hashable) or g is None:
                raise checks.fail(
                    name, f"groups: every shared leaf needs a hashable id; got {g!r}."
                )
    order: dict = {}
    group = [order.setdefault(g, len(order)) for g in ids]
    if not order:
        raise checks.fail(name, "groups= was given but there are no shared (non-head) leaves.")
    return _Layout(treedef, heads, group, len(order))


def _merge(layout: _Layout, shared: list, heads: list) -> Any:
    shared_it, heads_it = iter(shared), iter(heads)
    return layout.treedef.unflatten(
        [next(heads_it) if f else next(shared_it) for f in layout.heads]
    )


# ---------------------------------------------------------------------------------------------
# Passes and folds


def _pass_one(
    kind: str, groups: list[list[jax.Array]], T: int, dtype: Any
) -> tuple[jax.Array, Any]:
    """Pass 1 per group, stacked ``(K, T, T)`` or ``(K, T)``, and each group's scale ``s``
    ``(K,)``: the true one is ``gram[k] * s[k]**2``.

    The fast path (``s = 1``) is taken unless a group's result over- or underflows; then that
    group's grads are divided by a power of two near their largest entry first (one more pass
    over the groups that need it: a layer of tiny gradients beside a layer of normal ones keeps
    its own Gramian).
    """
    K = len(groups)
    shape = (T, T) if kind == "full" else (T,)

    def fn(mats: list[jax.Array], inv: jax.Array | None = None) -> jax.Array:
        if not mats:
            return jnp.zeros(shape, dtype)
        out = tree.matrices_gramian(mats, inv) if kind == "full" else tree.sq_norms(mats, inv)
        return out.astype(dtype)

    gram = jnp.stack([fn(m) for m in groups])
    ones = jnp.ones((K,), dtype)
    if not any(m.shape[1] > 0 for ms in groups for m in ms):
        return gram, ones
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1) if kind == "full" else gram
    top = jnp.max(diag, axis=-1)  # (K,)
    fast = jnp.isfinite(top) & (top >= _TINY_GRAM)
    flats = [[m for m in mats if m.shape[1] > 0] for mats in groups]
    return _prescaled(gram, fast, flats, lambda k, inv: fn(groups[k], inv), dtype)


def _prescaled(
    gram: jax.Array,
    fast: jax.Array,
    flats: list[list[jax.Array]],
    again: Callable[[int, jax.Array], jax.Array],
    dtype: Any,
) -> tuple[jax.Array, jax.Array]:
    """Pass 1's fallback, shared by :func:`_pass_one` and :func:`_cross_pass`: ``(gram,
    scales)`` where every group's result ``gram[k]`` is ``fast``; otherwise, for each group that
    is not, the pass again (``again(k, inv)``) over its inputs (``flats[k]``, the non-empty
    matrices) divided by a power of two near their largest entry, and that power as its scale
    (the true result is ``gram[k] * scale[k]**2``)."""
    one = jnp.ones((), dtype)

    def rescaled(_: None) -> tuple[jax.Array, jax.Array]:
        grams, scales = [], []
        for k, flat in enumerate(flats):
            if not flat:
                grams.append(gram[k])
                scales.append(one)
                continue
            # A power of two, so the scaling is exact; a NaN or inf input stays non-finite.
            big = tree.max_abs(flat).astype(dtype)
            ok = jnp.isfinite(big)
            e = jnp.ceil(jnp.log2(jnp.where(ok & (big > 0), big, 1.0)))
            inv = jnp.where(ok, tree.pow2(-e, dtype), jnp.nan)
            grams.append(jnp.where(fast[k], gram[k], again(k, inv)))
            scales.append(jnp.where(fast[k] | ~ok, one, tree.pow2(e, dtype)))
        return jnp.stack(grams), jnp.stack(scales)

    ones = jnp.ones((len(flats),), dtype)
    return lax.cond(jnp.all(fast), lambda _: (gram, ones), rescaled, None)


def _cross_leaf(a: jax.Array, b: jax.Array, inv: jax.Array | None, dtype: Any) -> jax.Array:
    """``(T, C) x (T, C) -> (T, T)``: ``a b^T`` (of ``inv * a`` and ``inv * b`` with ``inv``), at
    full precision in ``dtype``. On CPU large float32 leaves go through a loop of small dots
    over column slices (one dot over 1e6 columns ran 4x slower there, measured at T = 10)."""

    def dot(x: jax.Array, y: jax.Array) -> jax.Array:
        if inv is not None:
            x, y = x.astype(dtype) * inv, y.astype(dtype) * inv
        elif x.dtype != y.dtype:
            x, y = x.astype(dtype), y.astype(dtype)
        dims = (((1,), (1,)), ((), ()))
        return lax.dot_general(
            x, y, dims, precision=lax.Precision.HIGHEST, preferred_element_type=dtype
        )

    step = tree._CHUNK_COLUMNS
    n = a.shape[1] // step
    if dtype == jnp.float64 or a.shape[1] <= tree._SMALL_LEAF:
        return dot(a, b)

    def loop(a: jax.Array, b: jax.Array) -> jax.Array:
        def body(i: jax.Array, acc: jax.Array) -> jax.Array:
            sl = lambda m: lax.dynamic_slice_in_dim(m, i * step, step, axis=1)
            return acc + dot(sl(a), sl(b))

        return lax.fori_loop(0, n, body, dot(a[:, n * step :], b[:, n * step :]))

    return lax.platform_dependent(a, b, cpu=loop, default=dot)


def _cross_pass(groups: list, seconds: list, T: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Pass 1 for ``Method.cross``: per group the cross-Gramian ``J J2^T`` ``(K, T, T)`` and its
    scale ``(K,)`` (true ``A = gram * s**2``). As :func:`_pass_one`: where a group's result is
    not finite or its largest entry is below ``_TINY_GRAM``, both samples are divided by one
    power of two near their largest entry and the pass runs again for that group."""

    def fn(
        mats: list[jax.Array], others: list[jax.Array], inv: jax.Array | None = None
    ) -> jax.Array:
        pairs = [(a, b) for a, b in zip(mats, others, strict=True) if a.shape[1] > 0]
        if not pairs:
            return jnp.zeros((T, T), dtype)
        return cast(jax.Array, sum(_cross_leaf(a, b, inv, dtype) for a, b in pairs)).astype(dtype)

    gram = jnp.stack([fn(m, o) for m, o in zip(groups, seconds, strict=True)])
    top = jnp.max(jnp.abs(gram), axis=(-2, -1))
    fast = jnp.all(jnp.isfinite(gram), axis=(-2, -1)) & (top >= _TINY_GRAM)
    # One power of two for both samples: the true A is gram * s**2 = (J / s)(J2 / s)^T s**2.
    flats = [
        [m for m in mats + others if m.shape[1] > 0]
        for mats, others in zip(groups, seconds, strict=True)
    ]
    return _prescaled(gram, fast, flats, lambda k, inv: fn(groups[k], seconds[k], inv), dtype)


def _fold(
    gram: jax.Array, gram_scale: jax.Array, s: jax.Array, kind: str
) -> tuple[jax.Array, jax.Array]:
    """``S G S`` in the Gramian's pre-scaled units: ``(gram', gram_scale')`` with
    ``gram' * gram_scale'**2 == S (gram * gram_scale**2) S`` and the largest scaled norm near 1
    (the common factor is a power of two: exact, and no over- or underflow for scales of any
    size). Zero scales give zero rows; a NaN scale gives NaN rows (the step is then skipped)."""
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1) if kind == "full" else gram
    diag = diag.reshape(-1, s.shape[-1]) if diag.ndim > 1 else diag[None]
    mag = jnp.max(jnp.where(diag > 0, diag, 0.0), axis=0)  # (T,) largest over groups
    log_s = jnp.log2(jnp.abs(s)) + jnp.log2(gram_scale)
    log_n = log_s + 0.5 * jnp.log2(mag)
    top = jnp.max(jnp.where(jnp.isfinite(log_n), log_n, -jnp.inf))
    lim = -(int(jnp.finfo(gram.dtype).minexp) + 1)  # as tree.pow2 clips it
    e = jnp.clip(jnp.where(jnp.isfinite(top), jnp.ceil(top), 0.0), -lim, lim)
    r = jnp.sign(s) * jnp.exp2(log_s - e)  # s * gram_scale / 2**e; 0 for s = 0; NaN for NaN
    rr = r[:, None] * r[None, :] if kind == "full" else r * r
    folded = gram * rr.reshape((1,) * (gram.ndim - rr.ndim) + rr.shape)
    return folded, tree.pow2(e, gram.dtype)


def _check_signal(name: str, sig: Signal, value: Any, T: int, task_grads: Any, dtype: Any) -> Any:
    if value is None:
        if sig.required:
            raise checks.fail(
                name,
                f"this method needs the extra argument {sig.name}{sig.why}; pass it as "
                f"tx.update(task_grads, state, params, {sig.name}=...).",
            )
        return None
    if sig.kind == "flag":
        if jnp.shape(value) != () or jnp.result_type(value) != jnp.bool_:
            raise checks.fail(
                name,
                f"{sig.name} must be a bool scalar; got shape {jnp.shape(value)}, dtype "
                f"{jnp.result_type(value)}.",
            )
        return jnp.asarray(value)
    if sig.kind == "task_vector":
        return checks.task_vector(name, sig.name, value, T, required=True, dtype=dtype)
    if sig.kind == "gramian":
        if jnp.shape(value) != (T, T):
            raise checks.fail(
                name, f"{sig.name} must have shape ({T}, {T}); got {jnp.shape(value)}."
            )
        return jnp.asarray(value).astype(dtype)
    want: Any = jax.tree.structure(task_grads)  # (Any: PyTreeDef does not resolve for mypy)
    got: Any = jax.tree.structure(value)
    shapes = [jnp.shape(x) for x in jax.tree.leaves(task_grads)]
    if got != want or [jnp.shape(x) for x in jax.tree.leaves(value)] != shapes:
        raise checks.fail(
            name,
            f"{sig.name} must have the structure and shapes of the task grads; got "
            f"{got} with shapes {[jnp.shape(x) for x in jax.tree.leaves(value)]}, expected "
            f"{want} with shapes {shapes}.",
        )
    return value


def _inputs(
    method: Method,
    T: int,
    task_grads: Any,
    task_losses: Any,
    task_mask: Any,
    extra: dict,
    dtype: Any,
) -> tuple[jax.Array | None, jax.Array | None, jax.Array, dict, jax.Array]:
    """The checked losses, mask (as given, and filled), signals, and whether they are finite
    (over the active tasks)."""
    name = method.name
    losses = checks.task_vector(
        name, "task_losses", task_losses, T, required=method.needs_losses, dtype=dtype
    )
    given_mask = checks.task_mask(name, task_mask, T)
    mask = jnp.ones((T,), bool) if given_mask is None else given_mask
    signals = {
        s.name: _check_signal(name, s, extra.get(s.name), T, task_grads, dtype)
        for s in method.signals
    }
    # A second sample (Method.cross) is proven finite by its finite cross-Gramian instead.
    ok = _finite_signals({k: v for k, v in signals.items() if k != method.cross}, mask)
    if losses is not None:
        ok &= jnp.all(jnp.isfinite(jnp.where(mask, losses, 0.0)))
    return losses, given_mask, mask, signals, ok


def _finite_signals(signals: dict, mask: jax.Array) -> jax.Array:
    ok = jnp.asarray(True)
    for v in signals.values():
        if v is None or jnp.result_type(jax.tree.leaves(v)[0]) == jnp.bool_:
            continue
        if isinstance(v, jax.Array) and v.shape == mask.shape:
            ok &= jnp.all(jnp.isfinite(jnp.where(mask, v, 0.0)))
        else:
            ok &= tree.all_finite(v)
    return ok


def _stable(new: Any, old: Any) -> Any:
    """``new`` cast leafwise to ``old``'s dtypes (the state keeps its dtypes)."""
    return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new, old)


def _params_dtype(params: Any) -> Any:
    return tree.acc_dtype(*(jnp.result_type(x) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------------------------
# The two builders


def aggregator(
    method: Method,
    *,
    num_tasks: int | None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
    seed: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Builds the optax transformation of ``method`` (see the module docstring)."""
    name = method.name
    num_tasks = checks.positive_int(name, "num_tasks", num_tasks)
    checks.choice(name, "nonfinite", nonfinite, NONFINITE)
    if groups is not None and method.gram is None:
        raise checks.fail(name, "groups= is for methods that read a Gramian; this one does not.")
    key_data = rng.key_data(name, 0 if seed is None else seed) if method.random else None
    fields = method.state_cls._fields
    reports = "weights" in fields and method.weights_fn is not None
    if method.cross is not None:
        declared = [s for s in method.signals if s.name == method.cross]
        if not declared or declared[0].kind != "task_grads" or declared[0].required:
            raise checks.fail(
                name, f"cross={method.cross!r} must name an optional task_grads signal."
            )
        if method.gram != "full" or method.prepare or method.gram_leaves or method.max_norm:
            raise checks.fail(
                name, "cross is not for prepare, gram_leaves, max_norm or gram != 'full'."
            )

    def init_fn(params: Any) -> Any:
        extras: dict = {}
        shared_params = params
        K = None
        if params is not None and jax.tree.leaves(params):
            layout = _layout(name, task_specific, groups, params, task_axis=False)
            K = layout.K
            leaves = jax.tree.leaves(params)
            shared_params = layout.treedef.unflatten(
                [None if h else x for x, h in zip(leaves, layout.heads, strict=True)]
            )
        elif groups is not None:
            raise checks.fail(name, "groups= needs the params in init, to count the groups.")
        extras.update(method.init_extra(num_tasks, shared_params))
        if K is not None:
            for f in method.per_group:
                extras[f] = jax.tree.map(lambda x: jnp.repeat(x[None], K, axis=0), extras[f])
        state: dict[str, Any] = {
            "count": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }
        if "weights" in fields:
            w = None
            if reports and num_tasks is not None:
                shape = (num_tasks,) if K is None else (K, num_tasks)
                w = jnp.zeros(shape, _params_dtype(params))
            state["weights"] = w
        if method.random:
            state["key"] = jnp.array(key_data, copy=True)
        return method.state_cls(**state, **extras)

    def update_fn(
        task_grads: Any,
        state: Any,
        params: Any = None,
        *,
        task_losses: Any = None,
        task_mask: Any = None,
        **extra: Any,
    ) -> tuple[Any, Any]:
        del params
        capture = extra.pop(CAPTURE, None)  # mtlopt.with_diagnostics asks for the Gramian
        modify = extra.pop(MODIFY, None)  # mtlopt.smooth_weights / refresh_weights
        refresh_every, smooth = method.refresh_every, None
        if modify is not None:
            refresh_every, smooth = _modifiers(method, modify, reports, state)
        task_grads, in_scales = tree.unwrap(task_grads)
        loss_only = task_grads is None
        if loss_only:
            T = _loss_only_tasks(method, num_tasks, task_losses)
            cdt = jnp.float32 if state.weights is None else state.weights.dtype
            layout = _Layout(None, [], [], None)
            shared, heads = [], []
        else:
            T = checks.num_tasks(name, task_grads, expected=num_tasks)
            layout = _layout(name, task_specific, groups, task_grads, task_axis=True)
            leaves = jax.tree.leaves(task_grads)
            cdt = tree.acc_dtype(*(x.dtype for x in leaves))
            shared = [x for x, h in zip(leaves, layout.heads, strict=True) if not h]
            heads = [x for x, h in zip(leaves, layout.heads, strict=True) if h]
        losses, given_mask, mask, signals, ok_in = _inputs(
            method, T, task_grads, task_losses, task_mask, extra, cdt
        )
        if given_mask is not None:  # rows of absent tasks may hold NaN: keep them out of sums
            shared = tree.select_tasks(mask, shared)
            heads = tree.select_tasks(mask, heads)
        # What with_diagnostics describes (before prepare and any scales): without prepare, the
        # (T, C) matrices below, laid out once for both passes; with it, these as they came.
        raw_shared = None
        if in_scales is not None:
            in_scales = lax.stop_gradient(in_scales.astype(cdt))
            ok_in &= jnp.all(jnp.isfinite(jnp.where(mask, in_scales, 0.0)))
            in_scales = jnp.where(mask, in_scales, 0.0)
        head_in_scales = in_scales

        key = new_key = None
        if method.random:
            new_key, key = jax.random.split(rng.wrap(state.key))
        ctx = Context(
            T,
            None,
            jnp.ones((), cdt),
            losses,
            mask,
            state,
            key=key,
            signals=signals,
            scales=in_scales,
            ok=ok_in,
            dtype=cdt,
        )

        extras: dict = {}
        ok = ok_in
        handed = None
        out_dtypes = [x.dtype for x in shared]  # the update's, whatever prepare hands on
        if method.prepare is not None:
            if capture is not None:
                raw_shared = [tree.as_matrix(x) for x in shared]
            prepared = method.prepare(shared, ctx)
            shared, handed = prepared.grads, prepared.gram
            extras.update(prepared.state)
            ok = ok & prepared.ok
            in_scales = None  # prepare applied them
            ctx = ctx._replace(state=state._replace(**prepared.state), scales=None)
        # Both passes read (T, P_leaf) matrices made once: a leaf that autodiff left in a
        # transposed layout (vmap of a matmul's VJP does) is then laid out row-major once, not
        # once for pass 1, once for its fallback branch and once for pass 2. Measured in a
        # jitted task_value_and_grad + mgda step of a 1e6-parameter MLP: temporaries 25.4 -> 17.7
        # parameter copies.
        shapes = [(x.shape[1:], d) for x, d in zip(shared, out_dtypes, strict=True)]
        shared = [tree.as_matrix(x) for x in shared]
        K = layout.K
        by_group = [
            [m for m, g in zip(shared, layout.group, strict=True) if g == k] for k in range(K or 1)
        ]
        partial = False
        if method.gram_leaves is not None and not loss_only:
            read = _gram_leaves(method, task_grads, layout)
            partial = not all(read)
            by_group = [[m for m, r in zip(shared, read, strict=True) if r]]
            handed = None  # prepare's norms (if any) cover every leaf
        second = None  # the second sample's shared matrices, by group (Method.cross)
        if method.cross is not None and not loss_only and signals[method.cross] is not None:
            other = jax.tree.leaves(signals[method.cross])
            other = [x for x, h in zip(other, layout.heads, strict=True) if not h]
            if given_mask is not None:
                other = tree.select_tasks(mask, other)
            other = [tree.as_matrix(x) for x in other]
            second = [
                [m for m, g in zip(other, layout.group, strict=True) if g == k]
                for k in range(K or 1)
            ]

        # The weights are constants of the update: nothing upstream of them is differentiated
        # (a solver loop could not be reverse-differentiated anyway).
        ctx = ctx._replace(losses=lax.stop_gradient(ctx.losses))

        def weighting(ctx: Context) -> tuple[jax.Array, dict, jax.Array, jax.Array]:
            """Pass 1 and the weights: ``(w, extras, ok, clip)``, ``clip`` the factor of
            ``max_norm`` (1 without it)."""
            if method.gram is not None:
                if second is not None:
                    gram, gscale = _cross_pass(by_group, second, T, cdt)
                elif handed is not None and K is None:
                    gram, gscale = _handed(method.gram, handed.astype(cdt), by_group, T, cdt)
                else:
                    gram, gscale = _pass_one(method.gram, by_group, T, cdt)
                    if capture is not None and raw_gram and not periodic:
                        box["raw_gram"] = (gram, gscale)
                if in_scales is not None:
                    fold = lambda g, gs: _fold(g, gs, in_scales, method.gram)
                    gram, gscale = jax.vmap(fold)(gram, gscale)
                if K is None:
                    gram, gscale = gram[0], gscale[0]
                ctx = ctx._replace(
                    gram=lax.stop_gradient(gram), gram_scale=lax.stop_gradient(gscale)
                )
            good = jnp.asarray(True)
            w, more = _weigh(method, ctx, K)
            w = lax.stop_gradient(jnp.where(mask, w, 0.0).astype(cdt))
            if ctx.gram is not None:
                good = jnp.all(jnp.isfinite(ctx.gram)) & jnp.all(jnp.isfinite(ctx.gram_scale))
            clip = jnp.ones((), cdt)
            if clipped and ctx.gram is not None and method.gram == "full" and not partial:
                clip = _clip_factor(_gram_norm(ctx.gram, ctx.gram_scale, w), method.max_norm)
            return w, more, good, clip

        # The Gramian of pass 1 is that of the task grads as they came (what with_diagnostics
        # reports) unless prepare replaced them or pass 1 read only some leaves.
        raw_gram = method.gram == "full" and method.prepare is None and not partial
        raw_gram = raw_gram and second is None
        box: dict = {}
        clipped = method.max_norm is not None and not (
            checks.concrete(method.max_norm) and float(np.asarray(method.max_norm)) == 0.0
        )
        periodic = method.weights_fn is not None and not (
            checks.concrete(refresh_every) and int(np.asarray(refresh_every)) == 1
        )
        # (None for per-coordinate methods: they have no weights.)
        w: Any = None
        clip: Any = None
        if method.weights_fn is not None and not periodic:
            w, more, good, clip = weighting(ctx)
            extras.update(more)
            ok &= good
        elif periodic:
            if method.reuse is None and getattr(state, "weights", None) is None:
                raise checks.fail(
                    name, "reusing weights between refreshes needs num_tasks (the stored weights)."
                )
            shape = jax.eval_shape(lambda: weighting(ctx))

            def again() -> tuple[jax.Array, dict, jax.Array, jax.Array]:
                more: dict
                if method.reuse is None:
                    w_old, more = state.weights, {}
                else:
                    w_old, more = method.reuse(ctx)
                more = {k: more.get(k, getattr(state, k)) for k in shape[1]}
                more = jax.tree.map(lambda x, s: jnp.asarray(x).astype(s.dtype), more, shape[1])
                w_old = lax.stop_gradient(jnp.where(mask, w_old, 0.0).astype(cdt))
                return w_old, more, jnp.asarray(True), jnp.full((), jnp.nan, cdt)

            fresh = state.count % jnp.asarray(refresh_every, state.count.dtype) == 0
            w, more, good, clip = lax.cond(fresh, lambda: weighting(ctx), again)
            extras.update(more)
            ok &= good
        if w is not None:
            if clipped and method.gram == "full" and not periodic and not partial:
                w = w * clip
            if smooth is not None:
                w = lax.stop_gradient(smooth(w, jnp.broadcast_to(mask, w.shape)).astype(cdt))
            ok &= jnp.all(jnp.isfinite(w))

        any_task = jnp.any(mask)
        new_state = state._replace(count=state.count + any_task.astype(jnp.int32), **extras)
        if reports and state.weights is not None:
            new_state = new_state._replace(weights=w)
        if new_key is not None:  # (method.random)
            new_state = new_state._replace(key=jax.random.key_data(new_key))
        fill = 0.0 if nonfinite == "skip" else jnp.nan

        if loss_only:
            updates = lax.cond(ok, lambda: w, lambda: jnp.full(w.shape, fill, cdt))
            if modify is not None:
                modify["ok"] = ok
            return updates, _finish(method, state, new_state, ok)

        applied = w if in_scales is None else w * in_scales  # weights on the raw rows
        head_w: Any = None
        if heads:
            scales = jnp.ones((T,), cdt)
            if method.head_scales is not None:
                scales = method.head_scales(ctx, w).astype(cdt)
            if head_in_scales is not None:
                scales = scales * head_in_scales
            head_w = lax.stop_gradient(jnp.where(mask, scales, 0.0))

        # Between refreshes (or without a full Gramian) the clip comes from the update itself.
        # (A Gramian of some leaves, gram_leaves, does not know the whole update's norm.)
        late_clip = clipped and w is not None and (periodic or method.gram != "full" or partial)
        if capture is not None:
            if "raw_gram" not in box:  # one pass more, for the diagnostics alone
                box["raw_gram"] = _pass_one(
                    "full", [shared if raw_shared is None else raw_shared], T, cdt
                )
            capture["gramian"] = _summed(*box["raw_gram"])

        def combine_all() -> Any:
            if method.coordinate is not None:
                outs = []
                for i, m in enumerate(shared):
                    if in_scales is not None:
                        m = (m.astype(cdt) * in_scales[:, None]).astype(m.dtype)
                    outs.append(method.coordinate(ctx, m, i).astype(m.dtype))
            else:
                outs = [
                    tree.combine(applied if K is None else applied[g], [m])[0]
                    for m, g in zip(shared, layout.group, strict=True)
                ]
            if late_clip:
                measure = lambda: _clip_factor(
                    lax.stop_gradient(_tree_norm(outs, cdt)), method.max_norm
                )
                # Known from the Gramian on refresh steps: measured only between them.
                f = lax.cond(jnp.isnan(clip), measure, lambda: clip) if periodic else measure()
                outs = [(o.astype(cdt) * f).astype(o.dtype) for o in outs]
                box["clip"] = f
            outs = [o.reshape(sh).astype(dt) for o, (sh, dt) in zip(outs, shapes, strict=True)]
            out_heads = tree.combine(head_w, heads) if heads else []
            return _merge(layout, outs, out_heads)

        # The non-finite policy, at the least cost: a finite Gramian (or squared norms) proves
        # the grads it was computed from finite, so Gramian methods decide before pass 2 and
        # never re-read the update; the others (and task-specific leaves, which are not in the
        # Gramian) check their output, a P-sized reduction. lax.cond, not jnp.where: measured
        # here (T=10, P=1e6), a select over the update added ~4 ms to mean()'s 2.3 ms.
        filled = lambda: jax.tree.map(lambda x: jnp.full(x.shape[1:], fill, x.dtype), task_grads)
        # A float16 update can overflow where its float32 sum did not: check those outputs.
        narrow = any(jnp.dtype(d) == jnp.float16 for d in out_dtypes + [x.dtype for x in heads])
        # A Gramian of some leaves (gram_leaves) proves only those finite.
        checked = method.gram is None or periodic or late_clip or partial
        if checked or heads or method.coordinate is not None or narrow:
            # The output is checked anyway: one cond after the check, not one before it too.
            updates = combine_all()
            ok &= tree.all_finite(updates)
            if method.coordinate is not None:  # trimming or a median may drop a NaN input
                ok &= tree.all_finite(shared)
            updates = lax.cond(ok, lambda: updates, filled)
        else:
            updates = lax.cond(ok, combine_all, filled)
        if "clip" in box and reports and state.weights is not None:
            new_state = new_state._replace(weights=w * box["clip"])
        if modify is not None:
            modify["ok"] = ok
        return updates, _finish(method, state, new_state, ok)

    # (update_fn names its first argument task_grads; optax's protocol: updates.)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # type: ignore[arg-type]


def loss_weighting(
    name: str,
    state_cls: type,
    weights_fn: Callable[[Context], tuple[jax.Array, dict]],
    *,
    num_tasks: int | None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    needs_losses: bool = True,
    seed: Any = None,
    **fields: Any,
) -> optax.GradientTransformationExtraArgs:
    """Builds a loss-weighting method (mean, linear, DWA, UW, FAMO, GLS, ...): weights from the
    losses, the state and the signals alone, so the loss-only mode (:func:`mtlopt.loss_weights`)
    is allowed; no Gramian pass; each head gets its task's weight (the gradient of
    ``sum_t w_t l_t``), so both modes give the same update. ``fields``: any other
    :class:`Method` field (``init_extra``, ``signals``, ``random``)."""
    method = Method(
        name,
        state_cls,
        weights_fn,
        gram=None,
        needs_losses=needs_losses,
        loss_weighting=True,
        head_scales=_same_weights,
        **fields,
    )
    return aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite, seed=seed
    )


def _same_weights(ctx: Context, w: jax.Array) -> jax.Array:
    """Each head gets its task's loss weight, as the trunk does (the gradient of
    ``sum_t w_t l_t`` with respect to task t's head is ``w_t g_t``)."""
    del ctx
    return w


def _summed(gram: jax.Array, gram_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-group pre-scaled Gramians ``(K, T, T)``, scales ``(K,)`` as one ``(gram, scale)``
    over all shared leaves (the true Gramian is ``gram * scale**2``), without overflow."""
    top = jnp.max(gram_scale)
    top = jnp.where(top > 0, top, 1.0)
    total = jnp.sum(jnp.square(gram_scale / top)[:, None, None] * gram, axis=0)
    return lax.stop_gradient(total), lax.stop_gradient(top)


def _clip_factor(norm: jax.Array, max_norm: Any) -> jax.Array:
    """``min(1, max_norm / norm)``; 1 for a zero norm (and for ``max_norm == 0``: no clip)."""
    m = jnp.asarray(max_norm, norm.dtype)
    over = (m > 0) & (norm > m)
    return jnp.where(over, m / jnp.where(over, norm, 1.0), 1.0)


def _gram_norm(gram: jax.Array, gram_scale: jax.Array, w: jax.Array) -> jax.Array:
    """``||sum_t w_t g_t||`` over all shared leaves, from the (per-group, pre-scaled) Gramian:
    ``sqrt(sum_k s_k^2 w_k^T G_k w_k)`` without over- or underflow of the scales."""
    gram = gram.reshape(-1, *gram.shape[-2:])
    w = w.reshape(-1, w.shape[-1])
    s = jnp.reshape(gram_scale, (-1,))
    top = jnp.max(s)
    top = jnp.where(top > 0, top, 1.0)
    # w scaled by the largest |w_t| ||g_t|| first: w^T G w may overflow where the norm does not.
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram, axis1=-2, axis2=-1), 0.0))
    r = jnp.max(jnp.abs(w) * norms * (s / top)[:, None])
    r = jnp.where((r > 0) & jnp.isfinite(r), r, 1.0)
    v = w / r
    q = jnp.maximum(jnp.einsum("ks,kst,kt->k", v, gram, v, precision=lax.Precision.HIGHEST), 0)
    return jnp.sqrt(jnp.sum(q * jnp.square(s / top))) * top * r


def _tree_norm(outs: list, dtype: Any) -> jax.Array:
    """The norm of a list of arrays, scaled by their largest entry (no over- or underflow)."""
    if not outs:
        return jnp.zeros((), dtype)
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(o)).astype(dtype) for o in outs]))
    inv = jnp.where(top > 0, 1.0 / jnp.where(top > 0, top, 1.0), 0.0)
    sq = sum(jnp.sum(jnp.square(o.astype(dtype) * inv)) for o in outs)
    return jnp.sqrt(sq) * top


def _gram_leaves(method: Method, task_grads: Any, layout: _Layout) -> list[bool]:
    """Per shared leaf: whether pass 1 reads it (``Method.gram_leaves``)."""
    assert method.gram_leaves is not None  # (the caller's condition)
    arg, spec = method.gram_leaves
    if layout.K is not None:
        raise checks.fail(method.name, f"{arg}= and groups= cannot be combined.")
    structs = _structs(task_grads, task_axis=True)
    flags = _flags(method.name, arg, spec, structs, layout.treedef, "bools")
    read = [bool(f) for f, h in zip(flags, layout.heads, strict=True) if not h]
    if not any(read):
        raise checks.fail(
            method.name,
            f"{arg} selects no shared leaf (task-specific leaves are not in the Gramian); it "
            "must mark at least one leaf that is not a head.",
        )
    return read


def _loss_only_tasks(method: Method, num_tasks: int | None, task_losses: Any) -> int:
    if not method.loss_weighting:
        raise checks.fail(
            method.name,
            "task_grads=None (the loss-only mode, mtlopt.loss_weights) is for methods whose "
            "weights depend only on the losses; this one needs the task gradients.",
        )
    if task_losses is None or jnp.ndim(task_losses) != 1:
        raise checks.fail(
            method.name,
            "the loss-only mode needs task_losses, a (T,) array with one loss per task; got "
            f"{None if task_losses is None else jnp.shape(task_losses)}.",
        )
    T = jnp.shape(task_losses)[0]
    if num_tasks is not None and num_tasks != T:
        raise checks.fail(method.name, f"built with num_tasks={num_tasks} but task_losses has {T}.")
    return T


def _handed(
    kind: str, handed: jax.Array, by_group: list, T: int, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """The squared norms ``prepare`` computed in its own pass, unless they over- or underflow
    (then pass 1 again, pre-scaled)."""
    top = jnp.max(handed)
    fast = jnp.isfinite(top) & (top >= _TINY_GRAM)
    return lax.cond(
        fast,
        lambda: (handed[None], jnp.ones((1,), dtype)),
        lambda: _pass_one(kind, by_group, T, dtype),
    )


def _weigh(method: Method, ctx: Context, K: int | None) -> tuple[jax.Array, dict]:
    """The weighting (with the method's own scales folded in), batched over groups."""
    weights_fn = method.weights_fn
    assert weights_fn is not None  # (the caller's condition)

    def solve(c: Context) -> tuple[jax.Array, dict]:
        s = None
        if method.scales is not None:
            assert method.gram is not None  # (a method's own scales fold into its Gramian)
            s = jnp.where(c.mask, method.scales(c).astype(c.dtype), 0.0)
            gram, gscale = _fold(c.gram, c.gram_scale, s, method.gram)
            c = c._replace(gram=gram, gram_scale=gscale)
        w, more = weights_fn(c)
        w = jnp.asarray(w).astype(c.dtype)
        return (w if s is None else s * w), more

    if K is None:
        return solve(ctx)
    per = {f: getattr(ctx.state, f) for f in method.per_group}
    keys = (
        None
        if ctx.key is None
        else jax.vmap(lambda k: jax.random.fold_in(ctx.key, k))(jnp.arange(K))
    )

    def one(
        gram: jax.Array, gram_scale: jax.Array, part: dict, key: Any, k: jax.Array
    ) -> tuple[jax.Array, dict]:
        c = ctx._replace(
            gram=gram, gram_scale=gram_scale, state=ctx.state._replace(**part), key=key, group=k
        )
        w, more = solve(c)
        stray = set(more) - set(method.per_group)
        if stray:
            raise checks.fail(
                method.name,
                f"under groups= it updated state fields {sorted(stray)} that are "
                "not per-group (Method.per_group).",
            )
        return w, more

    return jax.vmap(one, in_axes=(0, 0, 0, None if keys is None else 0, 0))(
        ctx.gram, ctx.gram_scale, per, keys, jnp.arange(K)
    )


def _modifiers(method: Method, modify: dict, reports: bool, state: Any) -> tuple[Any, Any]:
    """``(refresh_every, smooth)`` of the weight modifiers' request (module notes, "Weight
    modifiers"), checked at trace time."""
    who = " and ".join(modify.get("by", ("a weight modifier",)))
    if not reports:
        what = "combines per coordinate" if method.coordinate is not None else "keeps none"
        raise checks.fail(
            method.name, f"{who} wraps a method with (T,) weights; {method.name} {what}."
        )
    if getattr(state, "weights", None) is None:
        raise checks.fail(
            method.name,
            f"{who} needs the stored weights: build {method.name} with num_tasks=T.",
        )
    modify["consumed"] = modify.get("consumed", 0) + 1
    refresh_every = modify.get("refresh_every")
    if refresh_every is None:
        refresh_every = method.refresh_every
    elif not (checks.concrete(method.refresh_every) and int(method.refresh_every) == 1):
        raise checks.fail(
            method.name,
            f"{who}: this {method.name} already recomputes its weights periodically "
            "(its own argument, e.g. update_weights_every): set one of them, not both.",
        )
    return refresh_every, modify.get("smooth")


def _finish(method: Method, state: Any, new_state: Any, ok: jax.Array) -> Any:
    """The state after the step: the old one on a bad step (but for the fields ``prepare``
    guards itself), with the step counted in ``skipped``; dtypes kept."""
    kept = {f: getattr(new_state, f) for f in method.guarded}
    new_state = _stable(
        new_state._replace(**dict.fromkeys(kept)), state._replace(**dict.fromkeys(kept))
    )
    new_state = tree.where_tree(ok, new_state, state._replace(**dict.fromkeys(kept)))
    new_state = new_state._replace(**kept)
    return new_state._replace(skipped=state.skipped + (~ok).astype(jnp.int32))


def task_transform(
    method: Method,
    *,
    num_tasks: int | None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Builds a task -> task transformation from ``method.scales``: the output is a lazy
    :class:`~mtlopt.TaskScaled` that an aggregator after it folds in.

    On a bad step (non-finite active losses or scales) the transformation's state is left as it
    was (``skipped`` counts it) and its output is marked bad (``ok`` False, scales 0 with
    ``"skip"``, NaN with ``"propagate"``), so the aggregator after it skips its step, by its own
    policy. Masked tasks keep scale 1 (the aggregator leaves them out anyway).
    """
    name = method.name
    num_tasks = checks.positive_int(name, "num_tasks", num_tasks)
    checks.choice(name, "nonfinite", nonfinite, NONFINITE)

    def init_fn(params: Any) -> Any:
        extras = method.init_extra(num_tasks, params)
        zero = lambda: jnp.zeros((), jnp.int32)  # two buffers: a donated state may not share one
        return method.state_cls(count=zero(), skipped=zero(), **extras)

    def update_fn(
        task_grads: Any,
        state: Any,
        params: Any = None,
        *,
        task_losses: Any = None,
        task_mask: Any = None,
        **extra: Any,
    ) -> tuple[tree.TaskScaled, Any]:
        del params
        grads, in_scales = tree.unwrap(task_grads)
        T = checks.num_tasks(name, grads, expected=num_tasks)
        cdt = tree.acc_dtype(*(x.dtype for x in jax.tree.leaves(grads)))
        losses, _, mask, signals, ok = _inputs(method, T, grads, task_losses, task_mask, extra, cdt)
        ctx = Context(
            T, None, jnp.ones((), cdt), losses, mask, state, signals=signals, ok=ok, dtype=cdt
        )
        assert method.scales is not None  # (a task transform is its scales)
        s = jnp.where(mask, lax.stop_gradient(method.scales(ctx).astype(cdt)), 1.0)
        if in_scales is not None:
            s = s * jnp.where(mask, in_scales.astype(cdt), 1.0)
        ok &= jnp.all(jnp.isfinite(s))
        bad = 0.0 if nonfinite == "skip" else jnp.nan
        out = tree.TaskScaled(grads, jnp.where(ok, s, bad), ok)
        new_state = state._replace(count=state.count + jnp.any(mask).astype(jnp.int32))
        new_state = tree.where_tree(ok, new_state, state)
        return out, new_state._replace(skipped=state.skipped + (~ok).astype(jnp.int32))

    # (update_fn names its first argument task_grads; optax's protocol: updates.)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # type: ignore[arg-type]
