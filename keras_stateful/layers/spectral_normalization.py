"""`SpectralNormalization`: a layer's kernel divided by its spectral norm."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_stateful import _backend
from keras_stateful.layers import _checks
from keras_stateful.stateful_layer import StatefulLayer
from keras_stateful.types import Tensor

# As torch's `spectral_norm`: power iterations run when the state is built,
# so that the first sigma is already close to the largest singular value.
WARM_UP_ITERATIONS = 15
# The random start of the warm-up: fixed, so that the warm-started vectors
# depend on the kernel alone and `reset_state()` restores them exactly.
WARM_UP_SEED = 0

# Transposed convolutions are not among them: their kernel keeps the output
# axis second to last (torch's `dim=1`) and would need its own view.
SUPPORTED = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Embedding,
)


@keras.saving.register_keras_serializable(package="keras_stateful")
class SpectralNormalization(StatefulLayer):
    """Runs a layer with its kernel divided by the kernel's spectral norm.

    The kernel `K` is seen as a matrix `W` with the output units as rows (as
    `torch.nn.utils.parametrizations.spectral_norm` sees a weight): for a
    Keras kernel of shape `(..., out)` (`Dense`, `Conv1D/2D/3D`,
    `EinsumDense`) `W` is the transpose of `reshape(K, (-1, out))`. For an
    `Embedding` the table of shape `(input_dim, output_dim)` is `W` as
    stored, the vocabulary axis being the "out" axis: that is what torch's
    `spectral_norm(nn.Embedding(...))` does (its `dim=0`, the table's
    rows), so the same `u`, `v` and numbers come out. The state is
    `vector_u` (shape `(out,)`) and `vector_v` (shape `(in,)`), unit
    vectors. With `normalize(x) = x / max(||x||, epsilon)`:

    - in a training call, `power_iterations` times, without gradient:
      `u = normalize(W v)`, then `v = normalize(Wᵀ u)` (torch's order), and
      `u`, `v` are committed;
    - `sigma = uᵀ W v`, with the gradient through `W` only (`u` and `v` are
      constants), from the new vectors in training and the stored ones in
      inference (no iteration);
    - the wrapped layer runs with `K / sigma` (`K / max(sigma, epsilon)`, so
      an all-zero kernel gives zeros, not NaN). `K` itself is never written:
      it stays the trainable variable the optimizer updates.

    When the state is built, 15 power iterations from a fixed random start
    (as torch does at registration) give a first `sigma` that is already
    close; `reset_state()` restores those warm-started vectors.

    Keras 3's own `keras.layers.SpectralNormalization` overwrites the wrapped
    kernel with `W / sigma` at each training call on TensorFlow and PyTorch
    but not on JAX (an assign to a trainable variable is dropped there), so
    the three backends train different models; this layer writes only `u`
    and `v`.

    **`trainable=False`** stops the updates of `u` and `v` (and the
    gradients of the wrapped layer; recompile after changing it);
    `freeze_state()` stops only the updates.

    Args:
        layer: The layer to wrap: a `Dense`, `EinsumDense`, `Conv1D`,
            `Conv2D`, `Conv3D` or `Embedding` (or a subclass), built or not.
        power_iterations: Power iterations per training call, an int >= 1.
            Defaults to `1`.
        epsilon: The smallest norm `normalize` divides by. Defaults to
            `1e-12` (torch's `eps`).
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: The wrapped layer's inputs.
        training: Whether the call is in training mode (updates `u`, `v`).

    Example:

    ```python
    dense = keras.layers.Dense(3, kernel_initializer=keras.initializers.Constant(2.0))
    layer = keras_stateful.layers.SpectralNormalization(dense)
    y = layer(np.ones((1, 4), "float32"), training=True)  # 8 / 6.93 = 1.15 each
    layer.sigma()  # 6.93 = 2 * sqrt(4 * 3), the kernel's largest singular value
    dense.kernel  # still all 2.0: only vector_u and vector_v were written
    ```

    Reference:
        - [Miyato et al., 2018](https://arxiv.org/abs/1802.05957)
        - [`torch.nn.utils.parametrizations.spectral_norm`](https://pytorch.org/docs/stable/generated/torch.nn.utils.parametrizations.spectral_norm.html)
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        power_iterations: int = 1,
        epsilon: float = 1e-12,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        example = "SpectralNormalization(keras.layers.Dense(64), power_iterations=1)"
        self.layer = _wrappable(layer, example)
        self.power_iterations = _checks.integer(
            power_iterations,
            "power_iterations",
            layer="SpectralNormalization",
            example=example,
            minimum=1,
        )
        self.epsilon = _checks.number(
            epsilon,
            "epsilon",
            layer="SpectralNormalization",
            example="SpectralNormalization(layer, epsilon=1e-12)",
            exclusive_minimum=0.0,
        )
        self.vector_u: Any = None  # keras.Variables, created in build()
        self.vector_v: Any = None

    # -------------------------------------------------------------- the view

    @property
    def kernel(self) -> keras.Variable:
        """The wrapped layer's kernel (an `Embedding`'s table), never written."""
        name = (
            "embeddings" if isinstance(self.layer, keras.layers.Embedding) else "kernel"
        )
        variable = getattr(self.layer, name)
        if not isinstance(variable, keras.Variable):
            raise ValueError(
                f"Layer '{self.name}': the wrapped layer's `{name}` is not a "
                f"plain variable (received {type(variable).__name__}; LoRA or "
                "quantization?). Wrap the layer before enabling LoRA or "
                "quantizing it."
            )
        return variable

    def _matrix(self, kernel: Tensor) -> Tensor:
        """The kernel as a matrix `W` of shape `(out, in)`."""
        if isinstance(self.layer, keras.layers.Embedding):
            return kernel
        return ops.transpose(ops.reshape(kernel, (-1, kernel.shape[-1])))

    # ----------------------------------------------------------------- build

    def build(self, input_shape: Any) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
        kernel = self.kernel
        matrix = np.asarray(self._matrix(np.asarray(ops.convert_to_numpy(kernel))))
        u, v = warm_start(matrix.astype("float64"), self.epsilon)
        self.vector_u = self.add_state("vector_u", u.shape, _Constant(u))
        self.vector_v = self.add_state("vector_v", v.shape, _Constant(v))
        # Checked by Keras before `call`: inputs the wrapped layer would refuse
        # are refused before `u` and `v` move, in an error naming the wrapper.
        self.input_spec = self.layer.input_spec
        self.built = True

    # ------------------------------------------------------------------ call

    def call(self, inputs: Any, training: bool | Tensor | None = None) -> Tensor:
        kernel = ops.cast(_backend.read_stored_value(self.kernel), "float32")
        matrix = self._matrix(kernel)
        u, v = self.vector_u.value, self.vector_v.value
        if self.may_update(training):
            u, v = self._power_iterations(ops.stop_gradient(matrix), u, v)
            self.commit_state((self.vector_u, u), (self.vector_v, v), training=training)
        sigma = ops.sum(u * ops.matmul(matrix, v))
        normalized = kernel / ops.maximum(sigma, self.epsilon)
        return self._run_layer(inputs, normalized)

    def _power_iterations(
        self, matrix: Tensor, u: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        for _ in range(self.power_iterations):
            u = _normalize(ops.matmul(matrix, v), self.epsilon)
            v = _normalize(ops.matmul(u, matrix), self.epsilon)
        return ops.stop_gradient(u), ops.stop_gradient(v)

    def _run_layer(self, inputs: Any, normalized_kernel: Tensor) -> Any:
        """The wrapped layer's output with `normalized_kernel` in place of `K`.

        The layer's variables are mapped to their current values (the kernel
        to the normalized one) in a `keras.StatelessScope`: nothing is
        assigned, gradients flow through the mapped values, and inside a
        JAX trainer's scope the traced values are the ones used.
        """
        kernel = self.kernel
        mapping = [
            (
                variable,
                normalized_kernel
                if variable is kernel
                else _backend.read_stored_value(variable),
            )
            for variable in self.layer.variables
        ]
        with keras.StatelessScope(state_mapping=mapping):
            return self.layer(inputs)

    # ---------------------------------------------------------------- public

    def sigma(self) -> Tensor:
        """`uᵀ W v` from the stored vectors and the current kernel.

        After a training call this is the `sigma` that call divided by (for
        the kernel as it was then): the estimate of the kernel's largest
        singular value.
        """
        matrix = self._matrix(
            ops.cast(_backend.read_stored_value(self.kernel), "float32")
        )
        return ops.sum(self.vector_u.value * ops.matmul(matrix, self.vector_v.value))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.layer.compute_output_shape(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "power_iterations": self.power_iterations,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SpectralNormalization:
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


def warm_start(matrix: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """`(u, v)` after 15 power iterations on `matrix` from a fixed start."""
    rng = np.random.default_rng(WARM_UP_SEED)
    # Only v's start matters: the first iteration computes u from it.
    v = _normalize_np(rng.standard_normal(size=(matrix.shape[1],)), epsilon)
    u = np.zeros(matrix.shape[0])
    for _ in range(WARM_UP_ITERATIONS):
        u = _normalize_np(matrix @ v, epsilon)
        v = _normalize_np(matrix.T @ u, epsilon)
    return u.astype("float32"), v.astype("float32")


def _normalize(x: Tensor, epsilon: float) -> Tensor:
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x))), epsilon)


def _normalize_np(x: np.ndarray, epsilon: float) -> np.ndarray:
    return x / max(float(np.linalg.norm(x)), epsilon)


class _Constant:
    """An initializer that returns the given array (the warm-started vector)."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    def __call__(self, shape: Any, dtype: Any = None) -> Tensor:
        return ops.convert_to_tensor(self.value, dtype=dtype)


def _wrappable(layer: Any, example: str) -> keras.layers.Layer:
    """`layer`, if it is one whose kernel has its output units last."""
    if isinstance(layer, SUPPORTED):
        return layer
    raise ValueError(
        "SpectralNormalization wraps a Dense, EinsumDense, Conv1D, Conv2D, "
        "Conv3D or Embedding layer (a kernel with the output units last, or an "
        f"embedding table); received {layer!r}. Write e.g. `{example}`."
    )
