"""LoRA: low-rank adapters on a layer's projections, its base weights frozen.

A projection W (inputs..., outputs...) gains A (inputs..., r) and B (r, outputs...) and
computes x W + (alpha / r) (dropout(x) A) B. A starts random (uniform in
+-1/sqrt(fan_in), as PEFT's Kaiming-uniform init), B at zero, so an adapted model starts
equal to its base. A and B carry W's logical axes, with "lora" for the rank (replicated
by the rules), so each is sharded as the weight it adapts. The adapters are
nnx.LoRAParam variables: the trainer differentiates and optimizes those only.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig

# our weight names, by target
TARGETS = {"llama": {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate",
                     "up": "w_up", "down": "w_out"},
           "gpt2": {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "up": "w_in", "down": "w_out"}}
# how many leading dimensions of each weight (after "layers") are its inputs
INPUT_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_in": 1,
              "w_out": 1}
A, B = "_lora_a", "_lora_b"


def adapted(cfg: ModelConfig, moe: bool) -> list[str]:
    """The weights a layer stack adapts: the targets' (only attention's in a stack of
    mixture-of-experts layers, whose MLPs are experts)."""
    if not cfg.lora.enabled:
        return []
    names = [TARGETS[cfg.style][t] for t in cfg.lora.targets]
    return [n for n in names if not (moe and n in ("w_gate", "w_up", "w_out"))]


def adapters(key: jax.Array, name: str, weight: nnx.Param, rank: int, dtype
             ) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """(A, B) for the stacked weight `name` (L, inputs..., outputs...)."""
    shape, axes = weight.get_value().shape, weight.get_metadata()["logical_axes"]
    n = 1 + INPUT_DIMS[name]
    fan_in = math.prod(shape[1:n])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, (*shape[:n], rank), dtype, -bound, bound)
    b = jnp.zeros((shape[0], rank, *shape[n:]), dtype)
    return (nnx.LoRAParam(a, logical_axes=(*axes[:n], "lora")),
            nnx.LoRAParam(b, logical_axes=(axes[0], "lora", *axes[n:])))


def _einsums(eq: str, n_in: int) -> tuple[str, str]:
    """For a projection `eq` ("btd,dnh->btnh"): the einsums of x A and of (x A) B."""
    lhs, rest = eq.split(",")
    w, out = rest.split("->")
    ins, outs = w[:n_in], w[n_in:]
    batch = "".join(c for c in lhs if c not in ins)
    return f"{lhs},{ins}r->{batch}r", f"{batch}r,r{outs}->{out}"


def project(cfg: ModelConfig, p: Mapping[str, jax.Array], name: str, x: jax.Array, eq: str,
            key: jax.Array | None = None) -> jax.Array:
    """x times the layer's weight `name` by the einsum `eq`, plus its adapters' low-rank
    update where the layer has them; `key` draws the adapters' dropout (training)."""
    dt = x.dtype
    y = jnp.einsum(eq, x, p[name].astype(dt))
    if name + A not in p:
        return y
    to_rank, from_rank = _einsums(eq, INPUT_DIMS[name])
    if key is not None and cfg.lora.dropout > 0:  # a mask of its own for each weight
        key = jax.random.fold_in(key, list(INPUT_DIMS).index(name))
        keep = jax.random.bernoulli(key, 1.0 - cfg.lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora.dropout), 0).astype(dt)
    xa = jnp.einsum(to_rank, x, p[name + A].astype(dt))
    update = jnp.einsum(from_rank, xa, p[name + B].astype(dt))
    return y + (cfg.lora.alpha / cfg.lora.rank) * update


def merged(cfg: ModelConfig, name: str, w: jax.Array, a: jax.Array, b: jax.Array
           ) -> jax.Array:
    """The weight `name` with its adapters folded in, W + (alpha / r) A B, in W's dtype
    (one layer's arrays, or stacked with a leading layers axis)."""
    n_in = INPUT_DIMS[name]
    lead = "l" if a.ndim == n_in + 2 else ""
    n_out = b.ndim - 1 - len(lead)
    ins, outs = "defgh"[:n_in], "defgh"[n_in:n_in + n_out]
    delta = jnp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}",
                       a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + (cfg.lora.alpha / cfg.lora.rank) * delta).astype(w.dtype)


def merge_adapters(cfg: ModelConfig, params: nnx.State) -> nnx.State:
    """The parameters with every LoRA adapter folded into the weight it adapts and the
    adapters left out: a plain model's (its config: lora.rank 0, base_dtype's weights)."""
    flat = dict(nnx.to_flat_state(params))
    out = []
    for path, var in flat.items():
        if path[-1].endswith((A, B)):
            continue
        a = flat.get(path[:-1] + (path[-1] + A,))
        if a is not None:
            b = flat[path[:-1] + (path[-1] + B,)]
            var = var.replace(merged(cfg, path[-1], var.get_value(), a.get_value(),
                                     b.get_value()))
        out.append((path, var))
    return nnx.from_flat_state(out)
