"""``mtlopt.flax``: task grads of an ``nnx.Module`` through ``nnx.Optimizer``, a linen
``TrainState`` that forwards ``task_losses``, heads chosen by path; the same numbers as the
step written by hand with plain optax on the params pytree."""

from __future__ import annotations

import importlib
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
mflax = pytest.importorskip("mtlopt.flax")

T = 2


def test_import_error_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name == "flax" or name.startswith("flax."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "flax", None)
    monkeypatch.delitem(sys.modules, "mtlopt.flax")
    with pytest.raises(ImportError, match=re.escape('pip install "mtlopt[examples]"')):
        importlib.import_module("mtlopt.flax")


def test_mtlopt_itself_never_imports_flax():
    """Flax is imported only in mtlopt/flax.py (read from the sources: the test process has
    Flax loaded already)."""
    root = pathlib.Path(mtlopt.__file__).parent
    found = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "flax.py" and re.search(r"^\s*(import|from)\s+flax\b", p.read_text(), re.M)
    ]
    assert found == [], f"these modules import Flax (only mtlopt/flax.py may): {found}"


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(4, 8, rngs=rngs)
        self.heads = nnx.Linear(8, T, rngs=rngs)  # output t is task t's head

    def __call__(self, x):
        return self.heads(jax.nn.relu(self.trunk(x)))


def _data():
    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    return x, np.stack([x[:, 0], 10.0 * x[:, 1]], axis=1)


def _models(cls, n=1, tx=None):
    """``n`` models of ``cls`` with the same initial weights (and an ``nnx.Optimizer`` of the
    first over ``tx``), built in one jitted program: eagerly, Flax's initialisers and the
    optimizer's init build one small program each."""

    def build():
        models = tuple(cls(nnx.Rngs(0)) for _ in range(n))
        return models if tx is None else (*models, nnx.Optimizer(models[0], tx, wrt=nnx.Param))

    return nnx.jit(build)()


def test_by_path_reads_nnx_states_and_linen_params():
    # Params as Variables, as nnx.Optimizer's init sees them (abstract: nothing is computed)
    state = nnx.state(nnx.eval_shape(lambda: _Net(nnx.Rngs(0))), nnx.Param)
    spec = mtlopt.by_path("^heads/")
    assert spec(state)["heads"]["kernel"].get_value() is True
    assert spec(state)["trunk"]["bias"].get_value() is False
    pure = nnx.to_pure_dict(state)  # what nnx.Optimizer hands tx.update
    assert spec(pure) == {
        "heads": {"bias": True, "kernel": True},
        "trunk": {"bias": False, "kernel": False},
    }
    linen_params = {"params": {"Dense_0": {"kernel": 0}, "head_1": {"kernel": 0}}}
    assert mtlopt.by_path(lambda p: p.endswith("1/kernel"))(linen_params) == {
        "params": {"Dense_0": {"kernel": False}, "head_1": {"kernel": True}}
    }
    assert mtlopt.by_path("0/w")([{"w": 1}, {"w": 2}]) == [{"w": True}, {"w": False}]
    with pytest.raises(ValueError, match=r"mtlopt.by_path: pattern '\(' is not a regular"):
        mtlopt.by_path("(")
    with pytest.raises(ValueError, match=r"mtlopt\.by_path: pattern must be"):
        mtlopt.by_path(3)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _by_hand_heads(tree):
    return jax.tree.map_with_path(lambda p, _: "heads" in jax.tree_util.keystr(p), tree)


def test_nnx_step_through_the_optimizer_matches_the_step_by_hand():
    """A jitted ``nnx`` step (``mtlopt.flax.task_value_and_grad``, ``nnx.Optimizer`` over
    CAGrad with heads by path and SGD, ``task_losses`` passed): its losses and task grads are
    those of ``mtlopt.task_value_and_grad`` on the split params, each head moves by its own
    task's gradient, the trunk by CAGrad's combination with the weights the state reports."""
    x, y = _data()
    tx = optax.chain(
        mtlopt.cagrad(num_tasks=T, task_specific=mtlopt.by_path("^heads/")), optax.sgd(1.0)
    )
    model, opt = _models(_Net, tx=tx)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)

    def task_losses(m, x, y):
        return jnp.mean((m(x) - y) ** 2, axis=0)

    @nnx.jit
    def step(model, opt, params):
        losses, task_grads = mflax.task_value_and_grad(task_losses)(model, x, y)
        opt.update(model, task_grads, task_losses=losses)
        by_hand = lambda p: task_losses(nnx.merge(graphdef, nnx.State(p)), x, y)
        return losses, task_grads, *mtlopt.task_value_and_grad(by_hand)(params)

    losses, task_grads, losses2, grads = step(model, opt, params)
    assert isinstance(task_grads, nnx.State)
    np.testing.assert_allclose(losses, losses2, rtol=1e-6)
    # Compared in numpy (eager jax ops would each build a program).
    task_grads, grads, params = _np(nnx.to_pure_dict(task_grads)), _np(grads), _np(params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, task_grads, grads)
    after = _np(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    w = mtlopt.task_weights(opt.opt_state)
    assert isinstance(w, jax.Array) and w.shape == (T,)
    for leaf in ("kernel", "bias"):
        close(after["heads"][leaf], params["heads"][leaf] - grads["heads"][leaf].sum(0))
        want = params["trunk"][leaf] - np.tensordot(np.asarray(w), grads["trunk"][leaf], axes=1)
        close(after["trunk"][leaf], want)
    assert int(opt.step[...]) == 1


class _NormNet(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.heads = nnx.Linear(8, T, rngs=rngs)

    def __call__(self, x):
        return self.heads(self.drop(self.norm(jax.nn.relu(self.trunk(x)))))


def test_batch_stats_and_rng_counts_move_once_as_with_nnx_value_and_grad():
    """BatchNorm's statistics and Dropout's RNG count after one call equal those after
    ``nnx.value_and_grad`` of the summed losses (one forward pass), and the task grads sum to
    its gradient (the same dropout mask); aux comes back with ``has_aux``."""
    x, y = _data()
    ours, theirs = _models(_NormNet, 2)

    def task_losses(m):
        losses = jnp.mean((m(x) - y) ** 2, axis=0)
        return losses, jnp.sum(losses)

    @nnx.jit
    def both(ours, theirs):
        (losses, aux), task_grads = mflax.task_value_and_grad(task_losses, has_aux=True)(ours)
        total, grads = nnx.value_and_grad(lambda m: task_losses(m)[1])(theirs)
        return losses, aux, task_grads, total, grads

    losses, aux, task_grads, total, grads = both(ours, theirs)
    np.testing.assert_allclose(aux, total, rtol=1e-6)
    np.testing.assert_allclose(np.sum(losses), total, rtol=1e-6)
    assert isinstance(task_grads, nnx.State)
    summed = jax.tree.map(lambda g: g.sum(0), _np(nnx.to_pure_dict(task_grads)))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        summed,
        nnx.to_pure_dict(nnx.state(grads, nnx.Param)),
    )
    assert set(nnx.to_pure_dict(task_grads)) == {"trunk", "norm", "heads"}  # Params only
    for kind in (nnx.BatchStat, nnx.RngCount):
        a = nnx.to_pure_dict(nnx.state(ours, kind))
        b = nnx.to_pure_dict(nnx.state(theirs, kind))
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert int(ours.drop.rngs.count[...]) == 1
    assert not np.allclose(ours.norm.mean[...], 0.0)


class _LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = jax.nn.relu(linen.Dense(8)(x))
        return linen.Dense(T, name="heads")(h)


def test_linen_train_state_forwards_task_losses_under_jit_with_donation():
    """``TrainState.apply_task_gradients`` with DB-MTL (reads ``task_losses``) and SGD, jitted
    with the state donated, against plain optax on the params; two steps."""
    x, y = _data()
    net = _LinenNet()

    def make(heads):
        return optax.chain(mtlopt.db_mtl(num_tasks=T, task_specific=heads), optax.sgd(0.1))

    tx = make(_by_hand_heads(jax.eval_shape(net.init, jax.random.key(0), x)["params"]))

    @jax.jit  # one program (eagerly, every initialiser is one)
    def setup():
        params = net.init(jax.random.key(0), x)["params"]
        state = mflax.TrainState.create(
            apply_fn=net.apply, params=params, tx=make(mtlopt.by_path("heads"))
        )
        # Fresh buffers for the hand-written step: both are donated.
        params = jax.tree.map(lambda p: p + 0, params)
        return state, params, tx.init(params)

    state, params, opt_state = setup()

    def task_losses(p):
        return jnp.mean((net.apply({"params": p}, x) - y) ** 2, axis=0)

    def step(state, params, opt_state):
        losses, task_grads = mtlopt.task_value_and_grad(task_losses)(state.params)
        state = state.apply_task_gradients(task_grads=task_grads, task_losses=losses)
        losses2, grads2 = mtlopt.task_value_and_grad(task_losses)(params)
        updates, opt_state = tx.update(grads2, opt_state, params, task_losses=losses2)
        return state, optax.apply_updates(params, updates), opt_state

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    first = state
    for _ in range(2):
        state, params, opt_state = step(state, params, opt_state)
    assert first.opt_state[0].ema_grads["Dense_0"]["kernel"].is_deleted()  # donated, not copied
    assert int(state.step) == 2 and isinstance(state, mflax.TrainState)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, params
    )
    np.testing.assert_allclose(
        mtlopt.task_weights(state.opt_state), mtlopt.task_weights(opt_state), rtol=1e-5
    )


def test_overwrite_with_gradient_takes_the_largest_over_tasks():
    """Flax's fp8 collection bypasses ``tx`` (as in ``apply_gradients``) and takes the largest
    row: the amax of every task's gradient."""
    from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT as OWG

    params = {"params": {"w": np.zeros(2, np.float32)}, OWG: {"amax": np.zeros(3, np.float32)}}
    tx = optax.chain(mtlopt.mean(), optax.sgd(1.0))
    task_grads = {
        "params": {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)},
        OWG: {"amax": np.array([[1.0, 5.0, 0.0], [2.0, 4.0, 0.0]], np.float32)},
    }

    @jax.jit
    def step(params, task_grads):
        state = mflax.TrainState.create(apply_fn=None, params=params, tx=tx)
        return state.apply_task_gradients(task_grads=task_grads)

    state = step(params, task_grads)
    np.testing.assert_array_equal(state.params["params"]["w"], [-2.0, -3.0])
    np.testing.assert_array_equal(state.params[OWG]["amax"], [2.0, 5.0, 0.0])


@pytest.mark.slow
def test_fp8_linen_layer_trains_through_apply_task_gradients():
    """A real fp8 Dense (Flax's ``Fp8DirectDotGeneralOp``): the gradient-side amax history takes the
    larger of the two tasks' rows; the input-side rows are equal."""
    from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT as OWG

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.Dense(8, dot_general_cls=linen.Fp8DirectDotGeneralOp)(x)
            return linen.Dense(T)(jax.nn.relu(h))

    x, y = _data()
    net = Net()
    variables = net.init(jax.random.key(0), x)
    tx = optax.chain(mtlopt.cagrad(num_tasks=T), optax.sgd(0.1))
    state = mflax.TrainState.create(apply_fn=net.apply, params=variables, tx=tx)

    def task_losses(v):
        return jnp.mean((net.apply(v, x) - y) ** 2, axis=0)

    @jax.jit
    def step(state):
        losses, task_grads = mtlopt.task_value_and_grad(task_losses)(state.params)
        return state.apply_task_gradients(task_grads=task_grads, task_losses=losses), task_grads

    new, g = step(state)
    meta = g[OWG]["Dense_0"]["Fp8DirectDotGeneralOp_0"]
    got = new.params[OWG]["Dense_0"]["Fp8DirectDotGeneralOp_0"]
    np.testing.assert_array_equal(meta["input_amax_history"][0], meta["input_amax_history"][1])
    np.testing.assert_array_equal(
        got["output_grad_amax_history"], jnp.max(meta["output_grad_amax_history"], axis=0)
    )
    assert not np.array_equal(
        meta["output_grad_amax_history"][0], meta["output_grad_amax_history"][1]
    )
    assert np.isfinite(np.asarray(mtlopt.task_weights(new.opt_state))).all()


@pytest.mark.slow
def test_accumulate_inside_nnx_optimizer():
    """``mtlopt.accumulate`` as the optimizer's transformation: its state through Flax's
    ``OptArray`` wrappers, heads by path on the ``nnx.State``, the inner weights readable."""

    x, y = _data()
    (model,) = _models(_Net)
    inner = optax.chain(
        mtlopt.cagrad(num_tasks=T, task_specific=mtlopt.by_path("^heads/")), optax.sgd(0.1)
    )
    opt = nnx.Optimizer(model, mtlopt.accumulate(inner, every_k=2, num_tasks=T), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        losses, task_grads = mflax.task_value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2, 0))(
            model
        )
        opt.update(model, task_grads, task_losses=losses)

    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    step(model, opt)
    mid = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, before, mid)  # a micro-step: nothing applied
    step(model, opt)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert not np.array_equal(after["trunk"]["kernel"], before["trunk"]["kernel"])
    w = mtlopt.task_weights(opt.opt_state)
    assert isinstance(w, jax.Array) and w.shape == (T,) and np.all(np.asarray(w) > 0)
