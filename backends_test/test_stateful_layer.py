"""StatefulLayer: the gate, the guard, and each known Keras 3 trap, per backend."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_stateful
from backends_test.helpers import BACKEND, value_of
from backends_test.user_layers import Keras2StyleCenters, ScaledByRunningMean
from keras_stateful.layers import MovingAverage
from keras_stateful.testing import state_snapshot


@keras.saving.register_keras_serializable(package="backends_test")
class Accumulator(keras_stateful.StatefulLayer):
    """`total += sum(x)` and `count += batch size`, committed together."""

    def build(self, input_shape):
        self.total = self.add_state("total", (input_shape[-1],))
        self.count = self.add_state("count", (), dtype="int32")

    def call(self, inputs, training=None):
        inputs = ops.cast(inputs, "float32")
        self.commit_state(
            (self.total, self.total + ops.sum(inputs, axis=0)),
            (self.count, self.count + ops.shape(inputs)[0]),
            training=training,
        )
        return inputs


def built_accumulator(dim=3):
    layer = Accumulator()
    layer.build((None, dim))
    return layer


# ---- add_state ---------------------------------------------------------------


def test_add_state_is_non_trainable_float32_and_listed():
    keras.config.set_dtype_policy("mixed_float16")
    layer = built_accumulator()
    assert [v.name for v in layer.state_variables] == ["total", "count"]
    assert layer.total.dtype == "float32" and layer.count.dtype == "int32"
    assert not layer.total.trainable and not layer.total._autocast
    assert layer.trainable_variables == []


def test_add_state_refuses_trainable():
    layer = Accumulator()
    with pytest.raises(ValueError, match=r"received trainable=True.*add_weight"):
        layer.add_state("w", (2,), trainable=True)


# ---- the gate ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("training", "updates"),
    [(True, True), (False, False), (None, False), (np.bool_(True), True), (1, True)],
)
def test_python_training_gate(training, updates):
    layer = built_accumulator()
    layer(np.ones((2, 3), "float32"), training=training)
    assert np.array_equal(value_of(layer.total), [2, 2, 2] if updates else [0, 0, 0])
    assert layer.may_update(training) is updates


def test_may_update_is_known_before_the_call():
    layer = built_accumulator()
    assert layer.may_update(ops.convert_to_tensor(False))  # decided when it runs
    layer.freeze_state()
    assert layer.may_update(True)  # the switch is a variable, read when it runs
    layer.trainable = False
    assert not layer.may_update(True)
    with pytest.raises(TypeError, match=r"training.*received 'yes'"):
        layer.may_update("yes")


def test_call_without_training_does_not_update():
    layer = built_accumulator()
    layer(np.ones((2, 3), "float32"))
    assert value_of(layer.count) == 0


def test_trainable_false_stops_updates():
    layer = built_accumulator()
    layer.trainable = False
    layer(np.ones((2, 3), "float32"), training=True)
    assert value_of(layer.count) == 0


def test_freeze_state_stops_updates_but_not_gradient_training(rng):
    x = rng.normal(size=(16, 4)).astype("float32")
    inputs = keras.Input((4,))
    layer = ScaledByRunningMean(name="scaled")
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    layer.freeze_state()
    kernel_before = value_of(layer.kernel)
    model.fit(x, x * 2, batch_size=8, epochs=1, verbose=0)
    assert np.array_equal(value_of(layer.running_mean), np.ones(4))
    assert not np.allclose(value_of(layer.kernel), kernel_before)
    assert layer.state_frozen


def test_freeze_from_a_callback_takes_effect_in_compiled_fit(rng):
    """The switch is a variable: no recompile, also mid-epoch on JAX."""

    class FreezeAfterFirstBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                self.model.get_layer("acc").freeze_state()

    x = np.ones((8, 3), "float32")
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1)(Accumulator(name="acc")(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(
        x,
        np.zeros((8, 1)),
        batch_size=2,
        verbose=0,
        callbacks=[FreezeAfterFirstBatch()],
    )
    layer = model.get_layer("acc")
    assert value_of(layer.count) == 2, "only the first batch of 2 should count"
    layer.unfreeze_state()
    model.fit(x, np.zeros((8, 1)), batch_size=2, verbose=0)
    assert value_of(layer.count) == 10


def test_frozen_switch_is_saved(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, Accumulator(name="acc")(inputs))
    model.get_layer("acc").freeze_state()
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("acc").state_frozen


# ---- tensor `training` ---------------------------------------------------------


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function with a tf.bool")
def test_tf_function_with_symbolic_training():
    import tensorflow as tf

    layer = built_accumulator()

    @tf.function(input_signature=[tf.TensorSpec((None, 3)), tf.TensorSpec((), tf.bool)])
    def step(x, flag):
        return layer(x, training=flag)

    step(tf.ones((2, 3)), tf.constant(False))
    assert value_of(layer.count) == 0
    step(tf.ones((2, 3)), tf.constant(True))
    assert value_of(layer.count) == 2
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit with a traced bool")
def test_jax_jit_stateless_call_with_traced_training():
    import jax

    layer = built_accumulator()
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def step(non_trainable, x, flag):
        _, new = layer.stateless_call(trainable, non_trainable, x, training=flag)
        return new

    x = jax.numpy.ones((2, 3))
    unchanged = step(non_trainable, x, jax.numpy.array(False))
    updated = step(non_trainable, x, jax.numpy.array(True))
    index = [id(v) for v in layer.non_trainable_variables].index(id(layer.count))
    assert int(unchanged[index]) == 0 and int(updated[index]) == 2
    assert value_of(layer.count) == 0, "stateless_call must not touch the layer"


@pytest.mark.skipif(BACKEND != "torch", reason="a torch bool tensor")
def test_torch_tensor_training():
    import torch

    layer = built_accumulator()
    layer(torch.ones(2, 3), training=torch.tensor(False))
    assert value_of(layer.count) == 0
    layer(torch.ones(2, 3), training=torch.tensor(True))
    assert value_of(layer.count) == 2


def test_training_of_wrong_type_is_refused():
    layer = built_accumulator()
    with pytest.raises(TypeError, match=r"training.*received 'yes'"):
        layer(np.ones((2, 3), "float32"), training="yes")


# ---- non-finite guard ----------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_is_skipped_and_counted(bad):
    layer = built_accumulator()
    layer(np.ones((2, 3), "float32"), training=True)
    x = np.ones((2, 3), "float32")
    x[1, 2] = bad
    layer(x, training=True)
    # Atomic: the finite `count` is not committed either.
    assert state_snapshot(layer)["count"] == 2
    assert np.array_equal(value_of(layer.total), [2, 2, 2])
    assert layer.skipped_updates == 1


def test_finite_values_near_the_float32_limit_are_committed():
    # Their float32 sum overflows; each value is finite, so nothing is skipped.
    layer = built_accumulator(dim=4)
    big = np.full((1, 4), 3.0e38, "float32")
    layer(big, training=True)
    np.testing.assert_array_equal(value_of(layer.total), big[0])
    assert state_snapshot(layer)["count"] == 1
    assert layer.skipped_updates == 0


def test_guard_can_be_turned_off():
    layer = Accumulator(guard_non_finite=False)
    layer.build((None, 3))
    layer(np.full((2, 3), np.nan, "float32"), training=True)
    assert np.isnan(value_of(layer.total)).all()
    assert layer.skipped_updates == 0
    assert Accumulator.from_config(layer.get_config()).guard_non_finite is False


def test_non_finite_batch_in_compiled_fit_is_skipped_and_training_goes_on():
    x = np.ones((6, 3), "float32")
    x[2:4] = np.nan  # the second of three batches
    clean = np.ones((6, 1), "float32")
    inputs = [keras.Input((3,), name="stats_in"), keras.Input((1,), name="dense_in")]
    stats = Accumulator(name="acc")(inputs[0])
    prediction = keras.layers.Dense(1, name="dense")(inputs[1])
    model = keras.Model(inputs, {"dense": prediction, "stats": stats})
    model.compile(optimizer="sgd", loss={"dense": "mse"})
    history = model.fit(
        [x, clean], {"dense": clean}, batch_size=2, shuffle=False, verbose=0
    )
    layer = model.get_layer("acc")
    assert np.array_equal(value_of(layer.total), [4, 4, 4])
    assert value_of(layer.count) == 4
    assert layer.skipped_updates == 1
    assert np.isfinite(history.history["loss"][-1])


# ---- commit_state errors -------------------------------------------------------


def test_wrong_shape_is_refused_with_the_shapes():
    class WrongShape(Accumulator):
        def call(self, inputs, training=None):
            self.commit_state((self.total, ops.sum(inputs)), training=training)
            return inputs

    layer = WrongShape()
    with pytest.raises(ValueError, match=r"shape \(\), expected \(3,\)"):
        layer(np.ones((2, 3), "float32"), training=True)


def test_trainable_variable_is_refused():
    class CommitsKernel(keras_stateful.StatefulLayer):
        def build(self, input_shape):
            self.kernel = self.add_weight(name="kernel", shape=(3,))

        def call(self, inputs, training=None):
            self.commit_state((self.kernel, ops.zeros((3,))), training=training)
            return inputs

    with pytest.raises(ValueError, match=r"trainable variable.*add_state"):
        CommitsKernel()(np.ones((2, 3), "float32"), training=True)


def test_commit_needs_pairs():
    layer = built_accumulator()
    with pytest.raises(TypeError, match=r"\(variable, new_value\) pairs"):
        layer.commit_state(layer.total, training=True)


# ---- torch traps, tested on every backend ----------------------------------------


def test_read_then_commit_backward_uses_the_value_read(rng):
    """Torch raised 'modified by an inplace operation'; gradients use old state."""
    x = rng.normal(size=(4, 3)).astype("float32")
    layer = ScaledByRunningMean(momentum=0.5)
    layer.build((None, 3))
    layer.running_mean.assign(np.array([1.0, 2.0, 3.0], "float32"))
    grad = input_gradient(layer, x)
    np.testing.assert_allclose(grad, np.tile([1.0, 2.0, 3.0], (4, 1)), rtol=1e-6)
    np.testing.assert_allclose(
        value_of(layer.running_mean),
        0.5 * np.array([1, 2, 3]) + 0.5 * x.mean(0),
        rtol=1e-6,
    )


@pytest.mark.skipif(BACKEND != "torch", reason="saved-tensor hooks are PyTorch's")
def test_second_order_gradient_through_a_state_read_is_exact(rng):
    """The copies saved for backward keep their history for create_graph=True."""
    import torch

    x = rng.normal(size=(4, 3)).astype("float32")
    scale = np.array([0.5, 1.0, 1.5], "float32")
    layer = ScaledByRunningMean(momentum=0.5)
    layer.build((None, 3))
    layer.running_mean.assign(scale)
    xt = torch.tensor(x, requires_grad=True)
    total = ops.sum(ops.exp(layer(xt, training=True)))
    (grad,) = torch.autograd.grad(total, xt, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), xt)
    # d2/dx2 exp(s x) = s^2 exp(s x), with s the state read before the update.
    np.testing.assert_allclose(second.numpy(), scale**2 * np.exp(scale * x), rtol=1e-5)
    assert not np.allclose(value_of(layer.running_mean), scale)


def input_gradient(layer, x):
    """d sum(layer(x, training=True)) / dx, eagerly, with the update committed."""
    if BACKEND == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        ops.sum(layer(xt, training=True)).backward()
        return xt.grad.numpy()
    if BACKEND == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            total = tf.reduce_sum(layer(xt, training=True))
        return tape.gradient(total, xt).numpy()
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def total(x):
        out, new = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jax.numpy.sum(out), new

    grad, new = jax.grad(total, has_aux=True)(jax.numpy.asarray(x))
    for variable, value in zip(layer.non_trainable_variables, new, strict=True):
        variable.assign(value)
    return np.asarray(grad)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_update_is_not_lost(policy):
    """On torch an autocast state stayed 0.0 under mixed precision."""
    keras.config.set_dtype_policy(policy)
    layer = MovingAverage(momentum=0.5)
    layer(np.ones((4, 3), "float32"), training=True)
    assert layer.average.dtype == "float32"
    np.testing.assert_allclose(value_of(layer.average), [0.5, 0.5, 0.5])


def test_commit_to_an_autocast_weight_is_not_lost_either():
    """Even a plain add_weight(trainable=False) (autocast=True) is written."""

    class PlainWeight(keras_stateful.StatefulLayer):
        def build(self, input_shape):
            self.total = self.add_weight(
                name="total", shape=(3,), initializer="zeros", trainable=False
            )

        def call(self, inputs, training=None):
            new = self.total + ops.sum(ops.cast(inputs, "float32"), axis=0)
            self.commit_state((self.total, new), training=training)
            return inputs

    keras.config.set_dtype_policy("mixed_float16")
    layer = PlainWeight()
    layer(np.ones((2, 3), "float32"), training=True)
    np.testing.assert_allclose(value_of(layer.total), [2, 2, 2])


# ---- JAX traps ------------------------------------------------------------------


@pytest.mark.skipif(BACKEND != "jax", reason="tracer leak is a JAX trap")
def test_training_call_inside_users_jax_jit_says_use_stateless_call():
    import jax

    layer = built_accumulator()

    @jax.jit
    def step(x):
        return layer(x, training=True)

    with pytest.raises(RuntimeError, match="stateless_call"):
        step(jax.numpy.ones((2, 3)))
    assert value_of(layer.count) == 0


def test_callback_reads_state_through_self_model():
    """On JAX, state is attached to the model only when read via self.model."""
    seen = []

    class ReadCount(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(int(value_of(self.model.get_layer("acc").count)))

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(Accumulator(name="acc")(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(
        np.ones((6, 3)),
        np.zeros((6, 1)),
        batch_size=2,
        verbose=0,
        callbacks=[ReadCount()],
    )
    assert seen == [2, 4, 6]


# ---- reset, Keras-2 compatibility, config ------------------------------------------


def test_reset_state_restores_initializers_but_keeps_counter_and_switch():
    layer = built_accumulator()
    layer(np.ones((2, 3), "float32"), training=True)
    layer(np.full((2, 3), np.nan, "float32"), training=True)
    layer.freeze_state()
    layer.reset_state()
    assert state_snapshot(layer)["count"] == 0
    assert np.array_equal(value_of(layer.total), [0, 0, 0])
    assert layer.skipped_updates == 1 and layer.state_frozen


def test_keras2_add_update_commits_only_in_training(rng):
    features = rng.normal(size=(6, 2)).astype("float32")
    labels = np.array([0, 0, 1, 1, 1, 2], "int32")
    inputs = [keras.Input((2,)), keras.Input((), dtype="int32")]
    layer = Keras2StyleCenters(num_classes=3, alpha=0.5, name="centers")
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    model.predict([features, labels], verbose=0)
    assert not value_of(layer.centers).any()
    model.fit([features, labels], np.zeros((6, 1)), batch_size=6, verbose=0)
    expected = np.stack(
        [
            0.5 * features[labels == k].sum(0) / (1 + (labels == k).sum())
            for k in range(3)
        ]
    )
    np.testing.assert_allclose(value_of(layer.centers), expected, rtol=1e-5)


def test_add_update_refuses_callables():
    layer = built_accumulator()
    with pytest.raises(TypeError, match="commit_state"):
        layer.add_update(lambda: None)


def test_config_round_trip():
    layer = MovingAverage(0.9, zero_debias=True, guard_non_finite=False, name="ema")
    clone = MovingAverage.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


# ---- row commits ---------------------------------------------------------------


@keras.saving.register_keras_serializable(package="backends_test")
class RowWriter(keras_stateful.StatefulLayer):
    """Writes `rows` at `ids` of a (5, 2) table: the generic row commit."""

    def build(self, input_shape):
        self.table = self.add_state("table", (5, 2))

    def call(self, inputs, training=None):
        ids, rows = inputs
        self.commit_state((self.table, ids, rows), training=training)
        return rows


def test_row_commit_writes_only_those_rows_and_only_in_training():
    layer = RowWriter()
    ids = np.array([3, 1, 3], "int32")
    rows = np.array([[1, 2], [3, 4], [1, 2]], "float32")
    layer([ids, rows], training=False)
    assert not value_of(layer.table).any()
    layer([ids, rows], training=True)
    expected = np.zeros((5, 2), "float32")
    expected[[3, 1]] = [[1, 2], [3, 4]]
    np.testing.assert_array_equal(value_of(layer.table), expected)
    rows_with_nan = np.array([[9, 9], [np.nan, 0], [9, 9]], "float32")
    layer([ids, rows_with_nan], training=True)
    np.testing.assert_array_equal(value_of(layer.table), expected)
    assert layer.skipped_updates == 1


def test_row_commit_refuses_float_indices():
    layer = RowWriter()
    with pytest.raises(ValueError, match=r"1-D integer tensor.*float32.*int32"):
        layer([np.array([1.0], "float32"), np.ones((1, 2), "float32")], training=True)


# ---- logged values ---------------------------------------------------------------


class LogsBatchMean(keras_stateful.StatefulLayer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_logged_value("batch_mean")

    def call(self, inputs, training=None):
        self.log_value("batch_mean", ops.mean(inputs), count=ops.shape(inputs)[0])
        return inputs


def test_logged_value_is_a_batch_weighted_mean():
    layer = LogsBatchMean()
    layer(np.full((3, 2), 5.0, "float32"), training=True)
    with keras_stateful.evaluation_logging():
        layer(np.ones((1, 2), "float32"))
    assert layer.logged_values() == {"batch_mean": 4.0}


@pytest.mark.parametrize("training", [False, None])
def test_inference_records_no_logged_value(training):
    layer = LogsBatchMean()
    layer(np.full((3, 2), 5.0, "float32"), training=training)
    layer(np.full((3, 2), 5.0, "float32"))
    assert np.isnan(layer.logged_values()["batch_mean"])
    sums = [float(keras.ops.convert_to_numpy(v)) for v in layer.logged_variables]
    assert sums == [0.0, 0.0]


def test_logged_values_live_beside_the_weights():
    layer = LogsBatchMean(name="probe")
    layer.build((None, 2))
    paths = [v.path for v in layer.logged_variables]
    assert paths == ["probe/batch_mean_total", "probe/batch_mean_count"]
    assert not set(paths) & {v.path for v in layer.weights}
    assert set(paths) <= {v.path for v in layer.non_trainable_variables}


def test_a_symbolic_training_flag_gates_the_logged_value():
    layer = LogsBatchMean()
    flag = keras.ops.convert_to_tensor(False)
    layer(np.full((3, 2), 5.0, "float32"), training=flag)
    assert np.isnan(layer.logged_values()["batch_mean"])
    layer(np.full((2, 2), 1.0, "float32"), training=keras.ops.logical_not(flag))
    assert layer.logged_values() == {"batch_mean": 1.0}


def test_logging_an_undeclared_value_says_how_to_declare_it():
    class Undeclared(keras_stateful.StatefulLayer):
        def call(self, inputs):
            self.log_value("oops", ops.mean(inputs))
            return inputs

    with pytest.raises(ValueError, match=r"add_logged_value\('oops'\)"):
        Undeclared()(np.ones((2, 2), "float32"))


def test_find_stateful_layers_sees_nested_models():
    inner_in = keras.Input((3,))
    inner = keras.Model(inner_in, MovingAverage(name="inner_ma")(inner_in))
    outer_in = keras.Input((3,))
    outer = keras.Model(outer_in, Accumulator(name="acc")(inner(outer_in)))
    names = {layer.name for layer in keras_stateful.find_stateful_layers(outer)}
    assert names == {"inner_ma", "acc"}


@pytest.mark.skipif(BACKEND != "jax", reason="tracer leak is a JAX trap")
def test_logging_inside_users_jax_jit_records_nothing_and_leaks_nothing():
    import jax

    layer = LogsBatchMean()
    out = jax.jit(lambda x: layer(x, training=False))(jax.numpy.ones((2, 3)))
    np.testing.assert_array_equal(np.asarray(out), np.ones((2, 3)))
    assert np.isnan(layer.logged_values()["batch_mean"])
