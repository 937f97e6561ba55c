"""Type aliases used in public signatures."""

from typing import Any, TypeAlias

#: A backend tensor (jax.Array, tf.Tensor, torch.Tensor) or anything
#: `keras.ops.convert_to_tensor` accepts.
Tensor: TypeAlias = Any
