"""int8 weight-only quantization for serving (`serve.quantize: int8`).

Each layer projection W is stored as int8 values q with one scale s per output channel
(symmetric, round to nearest: s = max |W| over the channel's inputs / 127, q = round(W /
s)), beside it as the parameter `<name>_qscale` with W's logical axes (size 1, None, on
the input axes), so the rules shard both alike. The layer that uses W turns q back into
the compute dtype, q * s, just before its matmul (StackedBlocks' body): everything
after that is the one forward path, so a quantized model computes exactly what a model
whose weights are q * s computes. The weights take a quarter of their fp32 bytes (half
of bf16's); the activations, the embedding table, the output head, norms, biases and
MoE routers keep their dtype.

Shapes: L layers, D d_model, N heads, K kv heads, H head size, F mlp width, E experts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

MODES = ("int8",)
SCALE = "_qscale"  # not "_scale": norm scales end so
# each quantized weight's input axes: those its matmul contracts
INPUT_AXES = {"wq": ("embed",), "wk": ("embed",), "wv": ("embed",),
              "wo": ("heads", "head_dim"), "w_in": ("embed",),
              "w_gate": ("embed", "expert_embed"), "w_up": ("embed", "expert_embed"),
              "w_out": ("mlp",), "shared_gate": ("embed",), "shared_up": ("embed",),
              "shared_out": ("mlp",)}


def int8_per_channel(w: jax.Array, input_dims: tuple[int, ...]
                     ) -> tuple[jax.Array, jax.Array]:
    """(q int8, s fp32) with w ~ q * s: s = max |w| over `input_dims` / 127 (kept as
    size-1 dimensions; 1 where a channel is all zeros), q = round(w / s)."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=input_dims, keepdims=True)
    s = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(w / s), -127, 127).astype(jnp.int8), s


def dequantize(q: jax.Array, s: jax.Array, dtype) -> jax.Array:
    """q * s in `dtype`: the weight a quantized layer multiplies by."""
    return q.astype(dtype) * s.astype(dtype)


def split_scales(p: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """A layer's parameters without the scales, and the scales by the weight they scale
    ({} for a model that is not quantized)."""
    scales = {k.removesuffix(SCALE): v for k, v in p.items()
              if k.endswith(SCALE) and k.removesuffix(SCALE) in INPUT_AXES}
    scale_names = {name + SCALE for name in scales}
    return {k: v for k, v in p.items() if k not in scale_names}, scales


def param_bytes(model: nnx.Module) -> int:
    """The bytes of every parameter (LoRA adapters included)."""
    return sum(math.prod(v.shape) * v.dtype.itemsize
               for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def quantize(model: nnx.Module, mode: str) -> tuple[int, int]:
    """Quantize the layer projections of `model` (a Transformer) in place, each on the
    devices and layout it has, one weight at a time (the extra memory is one weight's int8
    copy and its scales). Returns the parameter bytes before and after."""
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r} is not one of {MODES}")
    before = param_bytes(model)
    for stack in model.stacks():
        for name in [n for n in vars(stack) if n in INPUT_AXES]:
            var = getattr(stack, name)
            if hasattr(stack, name + SCALE):  # already quantized
                continue
            axes = var.get_metadata()["logical_axes"]
            dims = tuple(i for i, a in enumerate(axes) if a in INPUT_AXES[name])
            scale_axes = tuple(None if i in dims else a for i, a in enumerate(axes))
            q, s = _quantized(var.get_value(), dims, tuple(axes), scale_axes, model.constrain)
            var.set_value(q)
            setattr(stack, name + SCALE, nnx.Param(s, logical_axes=scale_axes))
    return before, param_bytes(model)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantized(w, dims, axes, scale_axes, constrain):
    """int8_per_channel, q laid out as the weight was, s by its own logical axes."""
    q, s = int8_per_channel(w, dims)
    return constrain(q, axes), constrain(s, scale_axes)
