"""MemoryQueue against a NumPy re-implementation of MoCo's ring buffer.

The reference is facebookresearch/moco `_dequeue_and_enqueue`, written one key
at a time (`queue[ptr] = k; ptr = (ptr + 1) % K`), so that a batch larger than
the queue needs no special case: later keys overwrite earlier ones.
"""

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends_test.helpers import BACKEND, value_of
from keras_stateful.layers.memory_queue import MemoryQueue
from keras_stateful.testing import check_state_contract, state_snapshot
from keras_stateful.testing.state_contract import ContractScale, ContractScore

D = 3


class NumpyQueue:
    """MoCo's queue: returns the queue before the batch, then enqueues it."""

    def __init__(self, size, dim, normalize=False):
        self.queue = np.zeros((size, dim), "float64")
        self.pointer = self.filled = 0
        self.normalize = normalize

    def __call__(self, keys):
        before = self.queue.copy()
        mask = np.arange(len(self.queue)) < self.filled
        keys = keys.astype("float64")
        if self.normalize:
            norms = np.linalg.norm(keys, axis=1, keepdims=True)
            keys = keys / np.maximum(norms, 1e-12)
        for key in keys:
            self.queue[self.pointer] = key
            self.pointer = (self.pointer + 1) % len(self.queue)
            self.filled = min(self.filled + 1, len(self.queue))
        return before, mask


@keras.saving.register_keras_serializable(package="backends_test")
class QueueAndKeys(MemoryQueue):
    """Also passes the keys through, giving a probe model a gradient path.

    The queue a MemoryQueue returns is state, with no gradient to anything,
    so a model whose only output is that queue has no gradients at all
    (TensorFlow's and PyTorch's `fit` refuse to step); in MoCo the queries
    provide the path.
    """

    def call(self, keys, training=None):
        return super().call(keys, training=training), keys

    def compute_output_spec(self, keys, training=None):
        return super().compute_output_spec(keys), keras.KerasTensor(
            keys.shape, keys.dtype
        )


def check_against(layer, reference):
    state = state_snapshot(layer)
    np.testing.assert_allclose(state["queue"], reference.queue, rtol=1e-6)
    assert state["pointer"] == reference.pointer
    assert state["filled"] == reference.filled
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.valid_mask()),
        np.arange(layer.size) < reference.filled,
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_moco_ring_buffer_over_steps(normalize, rng):
    # size 7: wrap-around, batches that do not divide it, one equal to it,
    # and two larger than it (9, and 16 > 2 * size).
    layer = MemoryQueue(7, normalize=normalize, return_mask=True)
    reference = NumpyQueue(7, D, normalize)
    for batch_size in [3, 5, 2, 7, 9, 16]:
        keys = rng.normal(size=(batch_size, D)).astype("float32")
        queue, mask = layer(keys, training=True)
        expected_queue, expected_mask = reference(keys)
        # Read after the update: the returned queue is the one before it.
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(queue), expected_queue, rtol=1e-6
        )
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), expected_mask)
        check_against(layer, reference)


def test_returns_the_queue_before_the_batch(rng):
    layer = MemoryQueue(4)
    first = rng.normal(size=(2, D)).astype("float32")
    second = rng.normal(size=(2, D)).astype("float32")
    layer(first, training=True)
    before = value_of(layer.queue)
    out = layer(second, training=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), before)
    np.testing.assert_array_equal(value_of(layer.queue)[2:], second)
    np.testing.assert_array_equal(before[:2], first)


def test_filled_count_and_mask(rng):
    layer = MemoryQueue(5)
    layer.build((None, D))
    assert not keras.ops.convert_to_numpy(layer.valid_mask()).any()
    for batch_size, filled in [(2, 2), (2, 4), (2, 5), (3, 5)]:
        layer(rng.normal(size=(batch_size, D)).astype("float32"), training=True)
        assert state_snapshot(layer)["filled"] == filled
        mask = keras.ops.convert_to_numpy(layer.valid_mask())
        assert mask.dtype == bool and mask.shape == (5,)
        np.testing.assert_array_equal(mask, np.arange(5) < filled)


@pytest.mark.parametrize("hold", ["dropped", "tensor", "numpy"])
def test_each_returned_queue_stays_the_queue_before_its_batch(hold, rng):
    """PyTorch writes in place; a returned queue must not see later writes.

    Dropped: nothing outlives a step, as in `fit` (on PyTorch the layer then
    keeps one copy up to date by the written rows). Tensor: every returned
    queue is kept and checked at the end. NumPy: so is a NumPy array that
    shares its memory (`convert_to_numpy` without a copy).
    """
    layer = MemoryQueue(7)
    reference = NumpyQueue(7, D)
    held, expected = [], []
    for batch_size in [3, 5, 2, 7, 9, 16, 1, 4]:
        keys = rng.normal(size=(batch_size, D)).astype("float32")
        queue = layer(keys, training=True)
        expected.append(reference(keys)[0])
        if hold == "tensor":
            held.append(queue)
        elif hold == "numpy":
            held.append(keras.ops.convert_to_numpy(queue))
        else:
            held.append(keras.ops.convert_to_numpy(queue).copy())
        del queue
    for step, (queue, before) in enumerate(zip(held, expected, strict=True)):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(queue), before, rtol=1e-6, err_msg=f"{step}"
        )
    check_against(layer, reference)


@pytest.mark.parametrize("write", ["assign", "set_weights", "reset_state"])
def test_writes_from_outside_show_in_the_next_returned_queue(write, rng):
    layer = MemoryQueue(4)
    for _ in range(3):
        layer(rng.normal(size=(2, D)).astype("float32"), training=True)
    new = rng.normal(size=(4, D)).astype("float32")
    if write == "assign":
        layer.queue.assign(new)
    elif write == "set_weights":
        weights = {w.path.split("/")[-1]: w.numpy() for w in layer.weights}
        weights.update(queue=new, pointer=np.int32(1), filled=np.int32(4))
        layer.set_weights([weights[w.path.split("/")[-1]] for w in layer.weights])
    else:
        layer.reset_state()
        new = np.zeros_like(new)
    returned = layer(rng.normal(size=(2, D)).astype("float32"), training=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(returned), new)


@pytest.mark.parametrize("training", [False, None])
def test_inference_does_not_update(training, rng):
    layer = MemoryQueue(4, return_mask=True)
    layer(rng.normal(size=(3, D)).astype("float32"), training=True)
    before = state_snapshot(layer)
    queue, mask = layer(rng.normal(size=(3, D)).astype("float32"), training=training)
    after = state_snapshot(layer)
    assert all(np.array_equal(after[name], before[name]) for name in before)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(queue), before["queue"])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(mask), [True, True, True, False]
    )


def test_pointer_under_compiled_fit_matches_reference(rng):
    # The default jit_compile: XLA on JAX, a tf.function on TensorFlow.
    size = 10
    inputs = keras.Input((D,))
    layer = QueueAndKeys(size, name="queue")
    score = ContractScore()(layer(ContractScale()(inputs)), inputs)
    model = keras.Model(inputs, score)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    reference = NumpyQueue(size, D)

    # 6 steps of 4 keys: wrap-around with a batch that does not divide size.
    keys = rng.normal(size=(24, D)).astype("float32")
    model.fit(keys, np.zeros((24, 1)), batch_size=4, shuffle=False, verbose=0)
    for step in range(6):
        reference(keys[4 * step : 4 * step + 4])
    check_against(layer, reference)

    # One step of 13 > size keys; its loss is computed with the old queue:
    # (mean(queue) + mean(keys)) ** 2.
    keys = rng.normal(size=(13, D)).astype("float32")
    loss = model.train_on_batch(keys, np.zeros((13, 1)))
    before, _ = reference(keys)
    np.testing.assert_allclose(
        float(np.asarray(loss)), (before.mean() + keys.mean()) ** 2, rtol=1e-5
    )
    check_against(layer, reference)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    # Few distinct shapes keep JAX's eager per-shape compilation short; with
    # size 4 they are below, at and above size, dividing it or not.
    size=st.sampled_from([1, 4]),
    batch_sizes=st.lists(st.sampled_from([1, 3, 4, 9]), min_size=1, max_size=6),
)
def test_queue_holds_the_last_size_keys_in_ring_order(size, batch_sizes):
    layer = MemoryQueue(size)
    total = 0
    for batch_size in batch_sizes:
        # Key k (counting every key ever enqueued) is the row [k, -k].
        ids = np.arange(total, total + batch_size, dtype="float32")
        layer(np.stack([ids, -ids], axis=1), training=True)
        total += batch_size
    state = state_snapshot(layer)
    for slot in range(size):
        # The newest key that landed in this slot: the largest k < total
        # with k % size == slot; none if total <= slot.
        newest = slot + size * ((total - 1 - slot) // size)
        expected = [newest, -newest] if total > slot else [0, 0]
        np.testing.assert_array_equal(state["queue"][slot], expected)
    assert state["pointer"] == total % size
    assert state["filled"] == min(total, size)


def test_a_batch_with_a_non_finite_key_is_not_enqueued(rng):
    layer = MemoryQueue(4)
    layer(rng.normal(size=(2, D)).astype("float32"), training=True)
    before = state_snapshot(layer)
    keys = rng.normal(size=(3, D)).astype("float32")
    keys[1, 0] = np.nan
    layer(keys, training=True)
    after = state_snapshot(layer)
    assert all(np.array_equal(after[name], before[name]) for name in before)
    assert layer.skipped_updates == 1


def test_stores_float32_and_returns_the_compute_dtype(rng):
    keras.config.set_dtype_policy("mixed_float16")
    layer = MemoryQueue(4)
    keys = rng.normal(size=(2, D)).astype("float32")
    layer(keys, training=True)
    out = layer(keys, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert layer.queue.dtype == "float32"
    np.testing.assert_allclose(value_of(layer.queue)[:2], keys, rtol=1e-3)


def test_initializer_config_and_reset(rng):
    initializer = keras.initializers.RandomNormal(stddev=D**-0.5, seed=1)
    layer = MemoryQueue(6, normalize=True, queue_initializer=initializer)
    layer.build((None, D))
    initial = value_of(layer.queue)
    assert initial.any() and not keras.ops.convert_to_numpy(layer.valid_mask()).any()
    layer(rng.normal(size=(4, D)).astype("float32"), training=True)
    layer.reset_state()
    np.testing.assert_array_equal(value_of(layer.queue), initial)
    assert (
        state_snapshot(layer)["pointer"] == 0 and state_snapshot(layer)["filled"] == 0
    )
    clone = MemoryQueue.from_config(layer.get_config())
    assert (clone.size, clone.normalize, clone.return_mask) == (6, True, False)
    clone.build((None, D))
    np.testing.assert_array_equal(value_of(clone.queue), initial)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "16"])
def test_bad_size_is_refused(size):
    with pytest.raises(
        ValueError, match=r"size must be an int >= 1.*MemoryQueue\(65536\)"
    ):
        MemoryQueue(size)


@pytest.mark.parametrize("shape", [(None, None), (None, 2, D), (D,)])
def test_keys_of_wrong_rank_or_unknown_dim_are_refused(shape):
    with pytest.raises(ValueError, match=r"\(batch, dim\).*received shape"):
        MemoryQueue(4).build(shape)


def test_keys_of_another_dim_are_refused(rng):
    layer = MemoryQueue(4)
    layer(rng.normal(size=(2, D)).astype("float32"))
    with pytest.raises(ValueError, match=r"\(batch, 3\).*received shape \(2, 5\)"):
        layer(rng.normal(size=(2, 5)).astype("float32"))


def test_integer_keys_are_refused(rng):
    with pytest.raises(TypeError, match=r"floats; received dtype int32.*ops\.cast"):
        MemoryQueue(4)(np.ones((2, D), "int32"))


def test_mask_of_an_unbuilt_layer_says_to_call_it():
    with pytest.raises(ValueError, match=r"not built.*layer\(keys\)"):
        MemoryQueue(4).valid_mask()


def test_state_contract(rng):
    # Two steps of 4 keys into 6 slots: the second one wraps around.
    keys = rng.normal(size=(8, D)).astype("float32")
    check_state_contract(
        lambda: MemoryQueue(
            6,
            normalize=True,
            return_mask=True,
            queue_initializer=keras.initializers.Ones(),
        ),
        keys,
    )


# ---- PyTorch: one copy kept up to date, rebuilt whenever it may be in use -------


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch writes the queue in place")
def test_torch_training_steps_reuse_one_copy_of_the_queue(rng):
    """With nothing holding the last returned queue, no (size, D) copy is made."""
    import torch

    layer = MemoryQueue(64)
    query = torch.tensor(rng.normal(size=(8, D)).astype("float32"), requires_grad=True)
    buffers = set()
    for _ in range(6):
        negatives = layer(rng.normal(size=(8, D)).astype("float32"), training=True)
        (query @ negatives.T).sum().backward()  # autograd saves, then frees, it
        buffers.add(negatives.untyped_storage().data_ptr())
        del negatives
    assert len(buffers) == 1


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch writes the queue in place")
def test_torch_two_calls_before_one_backward_give_exact_gradients(rng):
    """Autograd still holds the first queue when the second call writes."""
    import torch

    layer, reference = MemoryQueue(5), NumpyQueue(5, D)
    for _ in range(2):  # fill part of the queue first
        keys = rng.normal(size=(2, D)).astype("float32")
        layer(keys, training=True)
        reference(keys)
    query = torch.tensor(rng.normal(size=(4, D)).astype("float32"), requires_grad=True)
    loss, expected = 0.0, 0.0
    for _ in range(2):
        keys = rng.normal(size=(3, D)).astype("float32")
        loss = loss + (query @ layer(keys, training=True).T).sum()
        expected = expected + reference(keys)[0].sum(axis=0)
    loss.backward()
    np.testing.assert_allclose(query.grad.numpy(), np.tile(expected, (4, 1)), rtol=1e-5)
