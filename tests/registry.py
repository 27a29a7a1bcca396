"""One row per method: how to build it and what it claims. Every shared test runs every row.

A new method adds a row here and inherits the whole contract and property suite. The claims
below are explicit: a row opts in or out of a property by its fields, and the tests never ask
for a row by name. The per-row checks run from a few compiled programs per row (see
``tests/batch.py``); tests parametrized with :func:`params` keep a row's tests on one
pytest-xdist worker (``--dist loadgroup``), which compiles those programs once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import pytest

import mtlopt


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    # make(T, **common) -> transformation. ``common`` may hold task_specific=, nonfinite= and
    # num_tasks= (num_tasks=None builds the method without it; T is then only the size of
    # anything else T fixes, such as linear's weights).
    make: Callable[..., object]
    method: str = ""  # the public name in error messages (``mtlopt.<method>: ...``); "" = name
    kind: str = "aggregator"  # or "task_transform" (returns task grads, leading T kept)
    variant: bool = False  # a second setting of a method above: skipped by the heaviest tests
    needs_losses: bool = False  # reads task_losses (and a NaN loss skips the step)
    needs_num_tasks: bool = False  # the constructor raises without num_tasks
    order_free: bool = True  # permuting the tasks permutes the weights, keeps the update
    stateful_weights: bool = True  # task_weights(state) is a (T,) array when built with num_tasks
    weights_without_num_tasks: bool = False  # ... and also when built without it
    skips_nonfinite: bool = True  # state has count/skipped; a NaN/inf step is skipped
    # Scale of the update for T = 1 relative to the gradient (None: only the direction).
    t1_scale: Callable[[float], float] | None = lambda loss: 1.0
    # Scale of the update when all T tasks have the same gradient g, as a function of
    # (T, loss), losses all equal (None: only the direction is checked).
    identical_scale: Callable[[int, float], float] | None = None
    # The fixed (T,) weights, for a method whose update is always sum_t w_t g_t (masked: w_t = 0).
    fixed_weights: Callable[[int], np.ndarray] | None = None
    cancels_opposite: bool = True  # two exactly opposite tasks give a zero update
    zero_task_stationary: bool = False  # one zero task gradient gives a zero update (0 in hull)
    non_conflicting: bool = False  # <g_t, d> >= ||d||^2 for every task (MGDA's min-norm point)
    # All grads times a tiny s (1e-30, 1e-20): the direction of s = 1 (no eps or floor in the
    # method's normalization). Huge s (1e20, 1e30) is checked for every row.
    scale_invariant_direction: bool = True
    # The weights depend on the task grads only through their Gramian (and the losses):
    # rotated task grads give the same weights, and mtlopt.weights_from_gramian applies.
    gramian_only: bool = True
    # With the weights held fixed (stop_gradient), the update is linear in the task grads from
    # the initial state: d/ds sum(update(s * J)) at s = 1 equals sum(update(J)).
    grad_linear: bool = True
    task_state: tuple[str, ...] = ()  # state fields with a leading T axis (masked rows kept)
    seeded: bool = False  # takes seed= and keeps a PRNG key in the state
    # Extra arguments (declared signals) passed to every update, as (name, value) pairs.
    signals: tuple = ()
    # One leaf and the same vectors split into several give the same update (not so for
    # per-layer methods, groups="leaf": their weights differ from leaf to leaf by design).
    split_invariant: bool = True
    # The weights need only the losses (Method.loss_weighting): mtlopt.loss_weights before one
    # backward pass of sum_t w_t l_t gives the update of the method over the task grads
    # (tests/test_one_pass.py, over several steps, heads included).
    one_pass: bool = False
    # The skeleton feature this row stands for in the skeleton-only tests (training,
    # checkpoints, donation, apply_if_finite, memory, sharding, large leaves); "" = none. Those
    # tests run every other aggregator with -m slow.
    representative: str = ""
    # A weight modifier around the method (mtlopt.smooth_weights, ...): its name. Its own
    # errors carry it, and it raises for a method built without num_tasks at init, not at
    # construction (it cannot see the method's arguments).
    wrapper: str = ""

    def __post_init__(self):
        if not self.method:
            object.__setattr__(self, "method", self.name)

    def __repr__(self):
        return self.name


def _linear_weights(T):
    return np.linspace(1.0, 2.0, T).astype(np.float32)


def _nt(T, kwargs):
    """Keyword arguments with num_tasks=T unless the caller gave num_tasks (None included)."""
    return {"num_tasks": T, **kwargs}


ROWS = [
    Row(
        "mean",
        lambda T, **k: mtlopt.mean(**_nt(T, k)),
        identical_scale=lambda T, loss: 1.0,
        representative="no Gramian: weights from the mask only, output checked for finiteness",
        one_pass=True,
    ),
    Row(
        "linear",
        lambda T, **k: mtlopt.linear(_linear_weights(T), **k),
        order_free=False,
        weights_without_num_tasks=True,
        t1_scale=None,
        fixed_weights=_linear_weights,
        cancels_opposite=False,
        one_pass=True,
    ),
    Row(
        "cagrad",
        lambda T, **k: mtlopt.cagrad(c=0.4, **_nt(T, k)),
        t1_scale=lambda loss: 1.4 / 1.16,
        identical_scale=lambda T, loss: 1.4 / 1.16,
        representative="Gramian and solver (warm start in the state)",
    ),
    Row(
        "cagrad_rescale0",
        lambda T, **k: mtlopt.cagrad(c=0.5, rescale=0, **_nt(T, k)),
        method="cagrad",
        t1_scale=lambda loss: 1.5,
        identical_scale=lambda T, loss: 1.5,
        variant=True,
    ),
    Row(
        "cagrad_c0",
        lambda T, **k: mtlopt.cagrad(c=0.0, **_nt(T, k)),
        method="cagrad",
        identical_scale=lambda T, loss: 1.0,
        variant=True,
    ),
    Row(
        "mgda",
        lambda T, **k: mtlopt.mgda(**_nt(T, k)),
        identical_scale=lambda T, loss: 1.0,
        zero_task_stationary=True,
        non_conflicting=True,
    ),
    Row(
        "mgda_l2",
        lambda T, **k: mtlopt.mgda("l2", **_nt(T, k)),
        method="mgda",
        t1_scale=None,
        scale_invariant_direction=False,  # eps added to the norms
        variant=True,
    ),
    Row(
        "mgda_loss+",
        lambda T, **k: mtlopt.mgda("loss+", **_nt(T, k)),
        method="mgda",
        needs_losses=True,
        t1_scale=None,
        scale_invariant_direction=False,  # eps added to loss times norm
        variant=True,
    ),
    Row(
        "pcgrad",
        lambda T, **k: mtlopt.pcgrad(**{"seed": 0, **_nt(T, k)}),
        order_free=False,
        identical_scale=lambda T, loss: float(T),
        seeded=True,
        representative="PRNG key in the state",
    ),
    Row(
        "db_mtl",
        lambda T, **k: mtlopt.db_mtl(**_nt(T, k)),
        needs_losses=True,
        needs_num_tasks=True,
        t1_scale=lambda loss: 0.1 / (loss + 1e-8),
        identical_scale=lambda T, loss: 0.1 * T / (loss + 1e-8),
        gramian_only=False,
        task_state=("ema_grads",),
        representative="T x P state, prepare step (log losses and EMA) before pass 1",
    ),
]

ROWS += [
    Row(
        "trimmed_mean",
        # Trim one from each end where three tasks or more take part (T = 1, 2: none).
        lambda T, **k: mtlopt.trimmed_mean(1 if T >= 3 else 0, **_nt(T, k)),
        stateful_weights=False,  # per coordinate: no (T,) weights
        gramian_only=False,
        identical_scale=lambda T, loss: 1.0,
        representative="per-coordinate pass 2 (no weights, inputs checked for finiteness)",
    ),
    Row(
        "dwa",
        lambda T, **k: mtlopt.dwa(**_nt(T, k)),
        needs_losses=True,
        needs_num_tasks=True,
        gramian_only=False,
        identical_scale=lambda T, loss: float(T),  # the weights add up to T
        # Every step closes an epoch, so the weights move from the third step on.
        signals=(("new_epoch", True),),
        representative="loss weighting: a declared extra signal, weights from the losses",
        one_pass=True,
    ),
    Row(
        "mgda_per_leaf",
        lambda T, **k: mtlopt.mgda(groups="leaf", **_nt(T, k)),
        method="mgda",
        stateful_weights=False,  # (K, T) weights: one row per group
        gramian_only=False,
        identical_scale=lambda T, loss: 1.0,
        zero_task_stationary=True,
        split_invariant=False,
        representative="groups=: a (K, T, T) block Gramian, K problems solved in one batch",
    ),
]

# zero_task_stationary and non_conflicting stay off for both: a zero task constrains nothing
# (<0, d> >= 0), so the others' projections remain; the update is in the dual cone
# (<g_t, d> >= 0, tested in tests/test_dual_cone.py), not MGDA's <g_t, d> >= ||d||^2.
ROWS += [
    Row(
        "upgrad",
        lambda T, **k: mtlopt.upgrad(**_nt(T, k)),
        identical_scale=lambda T, loss: 1.0,
    ),
    Row(
        "dualproj",
        lambda T, **k: mtlopt.dualproj(**_nt(T, k)),
        identical_scale=lambda T, loss: 1.0,
    ),
]
# The peers' options (reg_eps, norm_eps) are tested against TorchJD in tests/test_dual_cone.py.

ROWS += [
    Row(
        "nash_mtl",
        lambda T, **k: mtlopt.nash_mtl(**_nt(T, k)),
        needs_num_tasks=True,
        # The update sums unit-norm task gradients (|d| = sqrt(T) for identical tasks), clipped
        # to max_norm = 1: its scale is 1 / |g|, not a function of the losses; only the
        # direction is claimed.
        t1_scale=None,
        identical_scale=None,
        # Two exactly opposed tasks have no positive solution: the regularised one has weights
        # ~ 1 / (|g| sqrt(ridge)) (ridge ~ 1e-6 in float32), and the update is 0 up to the
        # combination's rounding of those large weights, ~1e-5 |g| (tests/test_nash_mtl.py
        # checks the limit and that rounding).
        cancels_opposite=False,
    ),
]

# Krum needs T >= n_byzantine + 3 tasks (TorchJD's check, a ValueError at trace time). The
# shared suite also builds every row at T = 2 (its two-task program, which the masked scenarios
# are compared with): there the row stands in with the mean, which is Krum's documented
# fallback for fewer than n_byzantine + 3 active tasks (what krum gives two active tasks of
# three). The registry has no claim for a minimum T.
_krum = lambda T, n_selected=1, squared=True, **k: (
    mtlopt.mean(**_nt(T, k)) if T < 3 else mtlopt.krum(0, n_selected, squared=squared, **_nt(T, k))
)
ROWS += [
    Row(
        "imtl_g",
        lambda T, **k: mtlopt.imtl_g(**_nt(T, k)),
        identical_scale=lambda T, loss: 1.0,  # the weights sum to 1
        # Opposite tasks: c = G_u^+ 1 = 0, no direction with equal projections: zero update.
    ),
    Row(
        "config",
        lambda T, **k: mtlopt.config(**_nt(T, k)),
        identical_scale=lambda T, loss: float(T),  # the sum of the T projections
    ),
    Row(
        "aligned_mtl",
        lambda T, **k: mtlopt.aligned_mtl(**_nt(T, k)),
        identical_scale=lambda T, loss: float(T),  # B 1 summed (the authors' code)
    ),
    Row(
        "aligned_mtl_median_mean",
        lambda T, **k: mtlopt.aligned_mtl("median", reduction="mean", **_nt(T, k)),
        method="aligned_mtl",
        identical_scale=lambda T, loss: 1.0,  # B 1 / T (TorchJD)
        variant=True,
    ),
    Row(
        "krum",
        _krum,
        # Ties go to the lowest index, and with T = 3, n_byzantine = 0 (one neighbour per score)
        # the two tasks nearest each other always tie: permuting the tasks changes the choice.
        order_free=False,
        identical_scale=lambda T, loss: 1.0,  # all scores 0: the first task is chosen
    ),
    Row(
        "krum_multi",
        lambda T, **k: _krum(T, n_selected=2, squared=False, **k),
        method="krum",
        order_free=False,  # ties go to the lowest index (see "krum")
        identical_scale=lambda T, loss: 1.0,  # the mean of two identical gradients
        variant=True,
    ),
]

# GradVac per layer (groups=) and GradDrop with a (T,) leak are checked in tests/test_surgery.py
# (masks and skipped steps included), not as rows here: each such row cost 13-32 programs.
ROWS += [
    Row(
        "gradvac",
        lambda T, **k: mtlopt.gradvac(**{"seed": 0, **_nt(T, k)}),
        needs_num_tasks=True,  # (T, T) cosine targets in the state
        order_free=False,  # each task meets the others in a keyed random order (T >= 3)
        identical_scale=lambda T, loss: float(T),  # cosines 1: nothing altered, sums
        seeded=True,
        task_state=("targets",),  # a masked task's row of targets is kept
    ),
    Row(
        "graddrop",
        lambda T, **k: mtlopt.graddrop(**{"seed": 0, **_nt(T, k)}),
        stateful_weights=False,  # per coordinate: no (T,) weights
        gramian_only=False,
        identical_scale=lambda T, loss: float(T),  # one sign everywhere: kept whole, summed
        cancels_opposite=False,  # g and -g: each coordinate keeps one of them
        seeded=True,
        split_invariant=False,  # each leaf draws its own uniforms (fold_in of the leaf index)
    ),
]

ROWS += [
    Row(
        "ntkmtl",
        lambda T, **k: mtlopt.ntkmtl(**_nt(T, k)),
        # The default clips the update to norm 1 (the suite's gradients are larger): only the
        # direction is claimed for T = 1 and identical tasks. The clip's factor comes from the
        # (stop_gradient) Gramian, so the update stays linear in the grads with weights fixed.
        t1_scale=None,
    ),
    Row(
        "ntkmtl_noclip",
        lambda T, **k: mtlopt.ntkmtl(max_norm=0.0, **_nt(T, k)),
        method="ntkmtl",
        # w_t = (trace / |g_t|^2)^(1/2) = sqrt(T) for T identical tasks: T^1.5 g.
        identical_scale=lambda T, loss: float(T) ** 1.5,
        variant=True,
    ),
]

# --- rows: learned_scales ---
# Learned per-task s (UW's log-variances, IMTL's log-scales) in the state: the claims hold at
# the initial state (s = 0), where every scenario but the *_step1 ones starts. Their weights
# need the losses, not the Gramian (gramian_only off for the loss-only two); the optimizer's
# state (Adam: a scalar count beside the (T,) moments) is checked in tests/test_learned_scales.py.
ROWS += [
    Row(
        "uw",
        lambda T, **k: mtlopt.uw(**_nt(T, k)),
        needs_losses=True,
        needs_num_tasks=True,
        t1_scale=lambda loss: 0.5,  # 0.5 exp(-s) at s = 0 (Kendall's 1 / (2 sigma^2))
        identical_scale=lambda T, loss: 0.5 * T,
        gramian_only=False,
        task_state=("log_vars",),
        one_pass=True,
    ),
    # form="simplified" (twice the objective: weights exp(-s)) is tested in
    # tests/test_learned_scales.py, not as a row (a row costs ~12 programs).
    Row(
        "imtl_l",
        lambda T, **k: mtlopt.imtl_l(**_nt(T, k)),
        needs_losses=True,
        needs_num_tasks=True,
        identical_scale=lambda T, loss: float(T),  # exp(s) = 1 at s = 0: the sum
        gramian_only=False,
        task_state=("log_scales",),
        one_pass=True,
    ),
    Row(
        "imtl",
        lambda T, **k: mtlopt.imtl(**_nt(T, k)),
        needs_losses=True,
        needs_num_tasks=True,
        identical_scale=lambda T, loss: 1.0,  # IMTL-G at s = 0: the weights sum to 1
        # The weights depend on the Gramian, the losses and s: rotated task grads give the
        # same weights, and weights_from_gramian applies (with task_losses).
        task_state=("log_scales",),
    ),
]
# --- end rows: learned_scales ---

# --- rows: rate_balancing ---
# FAMO's logits move from the second step on; the suite's scenarios start from init or after one
# step on equal losses, where the logits do not move (no loss fell): its task_state claim is
# the stamp of each task's stored loss (a masked task's is kept, an active one's advances). Its
# logit update, masks and bad losses are checked in tests/test_rate_balancing.py.
ROWS += [
    Row(
        "famo",
        lambda T, **k: mtlopt.famo(**_nt(T, k)),
        needs_losses=True,
        needs_num_tasks=True,
        gramian_only=False,  # weights from the losses alone (no Gramian at all)
        identical_scale=lambda T, loss: 1.0,  # the first step: w_t = 1/T for equal losses
        task_state=("loss_step",),
        one_pass=True,
    ),
    Row(
        "gradnorm",
        lambda T, **k: mtlopt.gradnorm(**_nt(T, k)),
        needs_losses=True,
        needs_num_tasks=True,
        # layer=None: the norms are the Gramian's diagonal, so the weights (and their
        # learning) depend on the grads only through it.
        identical_scale=lambda T, loss: float(T),  # the weights start at 1 each: sums
        task_state=("learned",),
    ),
]
# --- end rows: rate_balancing ---

# --- rows: scalarizations ---
# Scalarizations of the losses F(l): the weights are dF/dl_t, functions of the losses alone
# (gramian_only off: they need the losses; the loss-only mode gives them). The preference rows
# use ones: the masked scenarios drop a task's entry, which is then the two-task preference.
ROWS += [
    Row(
        "gls",
        lambda T, **k: mtlopt.gls(**_nt(T, k)),
        needs_losses=True,
        identical_scale=lambda T, loss: 1.0,  # equal losses: 1/T each, the mean
        gramian_only=False,
        one_pass=True,
    ),
    Row(
        "stch",
        lambda T, **k: mtlopt.stch(**_nt(T, k)),
        needs_losses=True,
        # No warm-up, nadir 1: w_t = n softmax(log l / mu)_t / l_t; equal losses: 1 / l each.
        t1_scale=lambda loss: 1.0 / loss,
        identical_scale=lambda T, loss: T / loss,
        gramian_only=False,
        one_pass=True,
    ),
    Row(
        "stch_warmup",
        lambda T, **k: mtlopt.stch(mu=0.5, warmup_steps=2, **_nt(T, k)),
        method="stch",
        needs_losses=True,
        needs_num_tasks=True,  # the nadir is measured over the 2 warm-up steps
        # From the initial state every scenario is a warm-up step: w_t = 1 / l_t.
        t1_scale=lambda loss: 1.0 / loss,
        identical_scale=lambda T, loss: T / loss,
        gramian_only=False,
        # The nadir's running mean of a task with equal losses does not move; its count does.
        task_state=("nadir_count",),
        one_pass=True,  # 4 steps: 2 of warm-up, 2 against the measured nadir
        variant=True,
    ),
    Row(
        "cosmos",
        lambda T, **k: mtlopt.cosmos(np.ones(T, np.float32), **_nt(T, k)),
        needs_losses=True,
        weights_without_num_tasks=True,  # T is the preference's length
        identical_scale=lambda T, loss: float(T),  # l parallel to r: w = r = 1
        gramian_only=False,
        one_pass=True,
    ),
    Row(
        "pbi",
        lambda T, **k: mtlopt.pbi(np.ones(T, np.float32), **_nt(T, k)),
        needs_losses=True,
        weights_without_num_tasks=True,  # T is the preference's length
        identical_scale=lambda T, loss: float(np.sqrt(T)),  # on the ray: w = r / |r|
        gramian_only=False,
        one_pass=True,
    ),
]
# --- end rows: scalarizations ---

# --- rows: rlw_dwa ---
ROWS += [
    Row(
        "rlw",
        lambda T, **k: mtlopt.rlw(**{"seed": 0, **_nt(T, k)}),
        # Task t takes the t-th draw of the key, whatever task sits there: permuting the tasks
        # does not permute the weights of one draw (the law of the draw is exchangeable).
        order_free=False,
        identical_scale=lambda T, loss: 1.0,  # softmax weights add up to 1
        cancels_opposite=False,  # w_1 g - w_2 g with random w_1 != w_2
        seeded=True,
        one_pass=True,
    ),
]
# RLW's other distributions and its weights' law, dwa's window form: tests/test_loss_weighting.py.
# --- end rows: rlw_dwa ---

# --- rows: tracking ---
ROWS += [
    Row(
        "moco",
        lambda T, **k: mtlopt.moco(**_nt(T, k)),
        needs_losses=True,  # the default tracks loss-normalised gradients (the authors' code)
        needs_num_tasks=True,
        # The tracked gradient is beta * l * g / (|g| + eps): its scale is l / |g|, not a
        # function of the loss alone; only the direction is claimed.
        t1_scale=None,
        identical_scale=None,
        scale_invariant_direction=False,  # eps added to the norms (LibMTL's 1e-8)
        task_state=("tracked",),
    ),
    Row(
        "excess_mtl",
        lambda T, **k: mtlopt.excess_mtl(**_nt(T, k)),
        needs_num_tasks=True,
        identical_scale=lambda T, loss: 1.0,  # the first step's weights are uniform
        # The estimates sum g^2 / sqrt(S + eps) elementwise: not a function of the Gramian.
        gramian_only=False,
        task_state=("sq_sum",),
    ),
]
# The options (normalization="none", projection="softmax", warmup_steps, reduction="sum")
# and the peers' updates over several steps: tests/test_tracking.py.
# --- end rows: tracking ---

# --- rows: fair ---
ROWS += [
    Row(
        "fairgrad",
        lambda T, **k: mtlopt.fairgrad(**_nt(T, k)),
        # alpha = 1: the update sums unit-norm task gradients (Nash-MTL's system, unclipped):
        # its scale is 1 / |g|, not a function of the losses; only the direction is claimed.
        t1_scale=None,
        identical_scale=None,
        # Two exactly opposed tasks have no positive solution: the regularised one has weights
        # ~ 1 / (|g| sqrt(ridge)), and the update is 0 up to the combination's rounding of
        # those weights, ~1e-5 |g| (tests/test_fair.py checks the limit).
        cancels_opposite=False,
    ),
    Row(
        # alpha = 0.5: the weights scale as |g|^(-2/3), in float32's range for gradients of
        # 1e-30 to 1e30 (alpha > 1 is not: its weights overflow for 1e-30, see Bad values).
        "fairgrad_alpha05",
        lambda T, **k: mtlopt.fairgrad(alpha=0.5, **_nt(T, k)),
        method="fairgrad",
        variant=True,
        t1_scale=None,  # |d| = |g|^(1/3)
        identical_scale=None,
        cancels_opposite=False,
    ),
    Row(
        "pcd",
        lambda T, **k: mtlopt.pcd(**_nt(T, k)),
        needs_num_tasks=True,
        order_free=False,  # task 0 is the primary objective
        identical_scale=lambda T, loss: 1.0,  # d~ = g~_0 satisfies every constraint: d = g
        # g, -g: the secondary's guarantee gives d~ = -tau g~, rescaled to |g|: d = -g.
        cancels_opposite=False,
        # eps = 1e-8 in the normalisation 1 / sqrt(v + eps) dominates for tiny gradients (the
        # scales become equal): the direction changes (tests/test_fair.py checks it against
        # the float64 transcription).
        scale_invariant_direction=False,
    ),
]
# --- end rows: fair ---

# --- rows: stochastic ---
# The rows run the single-sample form (no second_sample: A = J J^T), as the shared suite's
# task grads come in one sample; the double-sample form (the cross-Gramian of second_sample),
# against a float64 transcription and TorchJD over several steps: tests/test_stochastic.py.
ROWS += [
    Row(
        "sdmgrad",
        lambda T, **k: mtlopt.sdmgrad(**_nt(T, k)),
        needs_num_tasks=True,  # the state keeps the inner variable w
        identical_scale=lambda T, loss: 1.0,  # weights on the simplex
        task_state=("inner",),
    ),
    Row(
        # MoDo's default (raw) rule steps lambda by gamma * A lambda: not homogeneous in the
        # gradients, so 1e20-scaled grads put all the weight on one task (its limit, tested in
        # tests/test_stochastic.py) and the contract's "huge gradients keep the direction of
        # scale 1" cannot hold for it. The row runs normalize=True (A / s^2, scale-free).
        "modo",
        lambda T, **k: mtlopt.modo(normalize=True, **_nt(T, k)),
        needs_num_tasks=True,  # the state keeps lambda
        identical_scale=lambda T, loss: 1.0,
        task_state=("lam",),
    ),
]
# --- end rows: stochastic ---

# --- rows: modifiers ---
# The weight modifiers wrap a method: their rows make the wrapped method whole (num_tasks is
# required: the modifiers read and keep the stored weights; without it init raises).
ROWS += [
    Row(
        "smooth_upgrad",
        lambda T, **k: mtlopt.smooth_weights(mtlopt.upgrad(**_nt(T, k)), alpha=0.5),
        method="upgrad",
        wrapper="smooth_weights",
        needs_num_tasks=True,
        identical_scale=lambda T, loss: 1.0,
    ),
    Row(
        # Every step of the batched scenarios is a refresh (step 0) or, in the multi-step
        # checks, reuses the weights of the step before.
        "refresh_mgda",
        lambda T, **k: mtlopt.refresh_weights(mtlopt.mgda(**_nt(T, k)), every=2),
        method="mgda",
        wrapper="refresh_weights",
        needs_num_tasks=True,
        identical_scale=lambda T, loss: 1.0,
        zero_task_stationary=True,
        non_conflicting=True,
    ),
]
# --- end rows: modifiers ---

AGGREGATORS = [r for r in ROWS if r.kind == "aggregator"]
ORDER_FREE = [r for r in AGGREGATORS if r.order_free]
# The heaviest tests (whole training runs) run every method once by default; the variants
# (other settings of the same method) run with -m slow.
HEAVY = [pytest.param(r, marks=pytest.mark.slow) if r.variant else r for r in AGGREGATORS]
# One row per skeleton feature, for the skeleton-only tests.
REPRESENTATIVES = [r for r in AGGREGATORS if r.representative]


def params(rows, slow: Callable[[Row], bool] = lambda row: False):
    """``pytest.param`` per row, grouped on one xdist worker per row (``--dist loadgroup``), so
    that the worker compiles the row's programs once; rows where ``slow(row)`` run with -m slow.
    """
    out = []
    for r in rows:
        marks = [pytest.mark.xdist_group(r.name)]
        if slow(r):
            marks.append(pytest.mark.slow)
        out.append(pytest.param(r, id=r.name, marks=marks))
    return out


def heavy(rows=None):
    """Every aggregator, variants with -m slow (the old HEAVY), grouped by row."""
    return params(AGGREGATORS if rows is None else rows, slow=lambda r: r.variant)


def skeleton(rows=None):
    """Every aggregator for a skeleton-only test: the representatives by default, the other
    rows with -m slow."""
    return params(AGGREGATORS if rows is None else rows, slow=lambda r: not r.representative)


_TRACES: collections.Counter = collections.Counter()


@functools.cache
def cached(row: Row, T: int):
    """``(tx, jax.jit(tx.update))`` built once per row and T, so tests share compilations.
    Every trace of the jitted update is counted (:func:`traces`)."""
    tx = row.make(T)

    def update(*args, **kwargs):
        _TRACES[row.name, T] += 1
        return tx.update(*args, **kwargs)

    return tx, jax.jit(update)


def traces(row: Row, T: int) -> int:
    """How many times ``cached(row, T)``'s update was traced in this process."""
    return _TRACES[row.name, T]
