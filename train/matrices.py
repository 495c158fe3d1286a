"""Optimizers that see each weight as matrices: Muon and Adafactor, on our layouts.

A parameter's logical axes say which of its dimensions form the matrix of a matmul:
`layers` and `experts` stack independent matrices (batch axes); of the rest, a weight
whose last axis is `embed` maps the others onto it (`wo`: heads x head_dim -> embed,
`w_out`: mlp -> embed), any other maps its first axis onto the rest (`wq`: embed ->
heads x head_dim, `head`: embed -> vocab). optax's `contrib.muon` would take only
exactly 2-D parameters and `optax.adafactor` factors the two largest dimensions, which
for a stacked (layers, embed, heads, head_dim) weight are not its matrix's.

Both transforms take and give trees of flax Variables, so their state carries logical
axes and is sharded like the parameters (Adafactor's factored moments with the
reduced dimensions' axes dropped to size 1, unsharded).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

BATCH_AXES = ("layers", "experts")
OUTPUT_LAST = ("embed", "expert_embed")


class Dims(NamedTuple):
    """Axis indices of one weight: stacked matrices, their rows (contracted with the
    input) and their columns (the output)."""
    batch: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]


def matrix_dims(logical_axes: Sequence[str | None]) -> Dims | None:
    """The weight's matrix axes, or None for vectors (norms, biases: no two axes left
    once the stacking axes are set aside)."""
    batch = tuple(i for i, a in enumerate(logical_axes) if a in BATCH_AXES)
    rest = [i for i in range(len(logical_axes)) if i not in batch]
    if len(rest) < 2:
        return None
    if logical_axes[rest[-1]] in OUTPUT_LAST:
        return Dims(batch, tuple(rest[:-1]), (rest[-1],))
    return Dims(batch, (rest[0],), tuple(rest[1:]))


def _is_var(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def _vars(tree: Any) -> list:
    """The Variables (or bare arrays) of a tree, in the order of its array leaves."""
    return jax.tree.leaves(tree, is_leaf=_is_var)


def weight_matrix(var: Any) -> Dims | None:
    """matrix_dims of a Variable's logical axes (None for a bare array or a vector)."""
    axes = var.get_metadata().get("logical_axes") if _is_var(var) else None
    return None if axes is None else matrix_dims(axes)


def _as_matrices(x: jax.Array, d: Dims) -> tuple[jax.Array, Any]:
    """(batch, rows, cols) view of `x`, and the function that undoes it."""
    order = (*d.batch, *d.rows, *d.cols)
    shape = [x.shape[i] for i in order]
    flat = x.transpose(order).reshape(
        math.prod(shape[:len(d.batch)]), math.prod(x.shape[i] for i in d.rows),
        math.prod(x.shape[i] for i in d.cols))
    inverse = [order.index(i) for i in range(x.ndim)]
    return flat, lambda m: m.reshape(shape).transpose(inverse)


def newton_schulz(m_NRC: jax.Array, steps: int, eps: float = 1e-7) -> jax.Array:
    """Muon's quintic Newton-Schulz iteration (coefficients of Jordan et al., 2024) on
    each of N matrices, in fp32: an approximately orthogonal matrix with the same
    singular vectors. One matrix at a time (`lax.map`), so only one layer's fp32
    iterates are alive at once."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = m_NRC.shape[1] <= m_NRC.shape[2]

    def one(x_RC):
        x = x_RC.astype(jnp.float32)
        x = x if wide else x.T
        x = x / jnp.maximum(jnp.linalg.norm(x), eps)
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return (x if wide else x.T).astype(x_RC.dtype)

    return jax.lax.map(one, m_NRC)


def _spread_axes(var: Any, constrain: Any, n: int) -> tuple[tuple[str, ...], int] | None:
    """Mesh axes to spread this weight's n stacked matrices over, whole: of the axes
    that split the weight, the largest set whose ways divide n (each device then
    orthogonalises n / ways matrices itself, instead of every matrix being multiplied
    piecewise across the devices, with collectives at each of the iteration's
    products), and their ways. None without a mesh, or where no set has more than one
    way."""
    if constrain is None or not _is_var(var):
        return None
    names = [a for a in var.get_metadata()["logical_axes"] if a is not None]
    axes = tuple(dict.fromkeys(m for a in names for m in constrain.mesh_axes(a)
                               if constrain.mesh.shape[m] > 1))
    best, best_ways = None, 1
    for k in range(len(axes), 0, -1):
        for subset in itertools.combinations(axes, k):
            ways = math.prod(constrain.mesh.shape[a] for a in subset)
            if ways > best_ways and n % ways == 0:
                best, best_ways = subset, ways
    return None if best is None else (best, best_ways)


def muon_matrices(momentum: float, nesterov: bool, ns_steps: int, constrain: Any = None
                  ) -> optax.GradientTransformation:
    """Muon's direction for matrix weights (torch.optim.Muon's definition): momentum
    buffer B = momentum B + (1 - momentum) g, the Nesterov blend (1 - momentum) g +
    momentum B (or B), orthogonalised per matrix, scaled by sqrt(max(1, cols / rows)).
    With `constrain` (the mesh and rules; sharding.ActivationSharding) a weight's
    stacked matrices are moved whole onto the devices that hold its pieces (an
    all-to-all each way) where their number divides."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, buf, params=None):
        buf = jax.tree.map(lambda b, g: momentum * b + (1 - momentum) * g, buf, updates)
        blend = (jax.tree.map(lambda b, g: (1 - momentum) * g + momentum * b, buf, updates)
                 if nesterov else buf)
        leaves, treedef = jax.tree.flatten(blend)
        out = []
        for g, var in zip(leaves, _vars(params)):
            d = weight_matrix(var)
            m, back = _as_matrices(g, d)
            scale = math.sqrt(max(1.0, m.shape[2] / m.shape[1]))
            spread = _spread_axes(var, constrain, m.shape[0])
            if spread is None:
                o = back(newton_schulz(m, ns_steps))
            else:  # (ways, N / ways, R, C): each device its own N / ways, one at a time
                axes, ways = spread
                m = constrain.split_leading(m.reshape(ways, -1, *m.shape[1:]), axes)
                o = jax.vmap(lambda part: newton_schulz(part, ns_steps))(m)
                o = constrain.split_leading(o, axes).reshape(-1, *o.shape[2:])
                o = constrain(back(o), var.get_metadata()["logical_axes"])  # its own layout
            out.append((scale * o).astype(g.dtype))
        return jax.tree.unflatten(treedef, out), buf

    return optax.GradientTransformation(init, update)


class Moments(NamedTuple):
    """Adafactor's second moments of one weight: row and column means of the squared
    gradient (factored), or the full moment (not factored); the unused ones are 0."""
    rows: Any
    cols: Any
    full: Any


class AdafactorState(NamedTuple):
    count: jax.Array
    moments: list


def _reduced(var: Any, value: jax.Array, dropped: tuple[int, ...]) -> Any:
    """`value` (var's shape with `dropped` axes of size 1) as a Variable whose dropped
    axes have no logical name, so they are never sharded."""
    if not _is_var(var):
        return value
    axes = tuple(None if i in dropped else a
                 for i, a in enumerate(var.get_metadata()["logical_axes"]))
    return var.replace(value=value, logical_axes=axes)


def _factored(var: Any, min_dim: int) -> Dims | None:
    d = weight_matrix(var)
    if d is None:
        return None
    shape = var.get_value().shape if _is_var(var) else var.shape
    sizes = [math.prod(shape[i] for i in group) for group in (d.rows, d.cols)]
    return d if min(sizes) >= min_dim else None


def _block_rms(x: jax.Array, var: Any) -> jax.Array:
    """Root mean square of each stacked block of `x` (over every axis but `layers` and
    `experts`): one value per layer's matrix, as if the layers were not stacked."""
    names = var.get_metadata().get("logical_axes") if _is_var(var) else ()
    axes = tuple(i for i in range(x.ndim) if i >= len(names) or names[i] not in BATCH_AXES)
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def _ema(old: Any, new: jax.Array, beta: jax.Array) -> Any:
    """beta * old + (1 - beta) * new, keeping old's Variable (and its logical axes)."""
    return jax.tree.map(lambda v: beta * v + (1 - beta) * new, old)


def adafactor_direction(eps: float, min_dim: int = 128, clip: float = 1.0,
                        decay_exponent: float = 0.8) -> optax.GradientTransformation:
    """Adafactor's update direction (Shazeer and Stern, 2018; optax.adafactor's
    defaults): the gradient over the root of a second moment decayed by 1 - t^-0.8 at
    step t, factored over each weight's matrix rows and columns (`matrix_dims`; both at
    least `min_dim` long) and full for the rest; clipped to RMS `clip` per block, then
    scaled by the block's parameter RMS (at least 1e-3): a relative step size. A block
    is one matrix of a stacked weight."""

    def init(params):
        moments = []
        for var in _vars(params):
            value = var.get_value() if _is_var(var) else var
            zero = jnp.zeros((), jnp.float32)
            d = _factored(var, min_dim)
            if d is None:
                moments.append(Moments(zero, zero, jax.tree.map(
                    lambda p: jnp.zeros_like(p, jnp.float32), var)))
                continue
            shape = value.shape
            rows = tuple(1 if i in d.cols else n for i, n in enumerate(shape))
            cols = tuple(1 if i in d.rows else n for i, n in enumerate(shape))
            moments.append(Moments(_reduced(var, jnp.zeros(rows, jnp.float32), d.cols),
                                   _reduced(var, jnp.zeros(cols, jnp.float32), d.rows), zero))
        return AdafactorState(jnp.zeros((), jnp.int32), moments)

    def update(updates, state, params=None):
        count = state.count + 1
        beta = 1.0 - count.astype(jnp.float32) ** -decay_exponent
        leaves, treedef = jax.tree.flatten(updates)
        out, moments = [], []
        for g, var, old in zip(leaves, _vars(params), state.moments):
            g32 = g.astype(jnp.float32)
            sq = g32 * g32 + eps
            d = _factored(var, min_dim)
            if d is None:
                full = _ema(old.full, sq, beta)
                u = g32 * jax.lax.rsqrt(jax.tree.leaves(full)[0])
                moments.append(Moments(old.rows, old.cols, full))
            else:
                rows = _ema(old.rows, sq.mean(d.cols, keepdims=True), beta)
                cols = _ema(old.cols, sq.mean(d.rows, keepdims=True), beta)
                r, c = jax.tree.leaves(rows)[0], jax.tree.leaves(cols)[0]
                u = g32 * jax.lax.rsqrt(r / r.mean(d.rows, keepdims=True) * c)
                moments.append(Moments(rows, cols, old.full))
            u = u / jnp.maximum(1.0, _block_rms(u, var) / clip)
            p = (var.get_value() if _is_var(var) else var).astype(jnp.float32)
            out.append((u * jnp.maximum(_block_rms(p, var), 1e-3)).astype(g.dtype))
        return jax.tree.unflatten(treedef, out), AdafactorState(count, moments)

    return optax.GradientTransformation(init, update)


__all__ = ["matrix_dims", "weight_matrix", "Dims", "newton_schulz", "muon_matrices",
           "adafactor_direction"]
