"""Pure per-layer functions of the Transformer block. Arrays in, arrays out.

Shapes: B batch, T length, D d_model, N query heads, K kv heads, H head size,
F mlp width, V vocab.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from models import lora
from models.attention import blocked_attention, cached_attention, splash_fits
from models.config import ModelConfig
from models.context import context_attention

if TYPE_CHECKING:
    from models.cache import KVCache

Constrain = Callable[[jax.Array, Sequence[str | None]], jax.Array]


def no_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    del logical_axes
    return x


def norm(x_BTD: jax.Array, scale_D: jax.Array, bias_D: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm when a bias is given (GPT-2), RMSNorm otherwise (Llama); statistics in
    fp32. Each applies its weights as the Hugging Face original does: LayerNorm's scale
    and bias in fp32, RMSNorm's scale in the compute dtype (Llama's `weight *
    hidden.to(input_dtype)`), so in bf16 an RMSNorm scale's gradient is also summed, and
    reduced across devices, in bf16 (MaxText's traffic; fp32 would double it)."""
    x = x_BTD.astype(jnp.float32)
    if bias_D is not None:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    if bias_D is None:
        return x.astype(x_BTD.dtype) * scale_D.astype(x_BTD.dtype)
    return (x * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(x_BTD.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """RoPE's inverse frequencies (head_size / 2,) fp32: theta^(-2i/H), and with
    rope_scaling="llama3" Llama-3.1's rescaling: wavelengths longer than
    original_max_len / low_freq_factor are stretched by `factor`, those shorter than
    original_max_len / high_freq_factor kept, those between interpolated linearly in
    original_max_len / wavelength."""
    half = cfg.head_size // 2
    inv_freq_h = 1.0 / (cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    if cfg.rope_scaling == "none":
        return inv_freq_h
    lo, hi, old = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
    wavelen_h = 2 * jnp.pi / inv_freq_h
    smooth_h = jnp.clip((old / wavelen_h - lo) / (hi - lo), 0.0, 1.0)  # 0: long, 1: short
    return (1 - smooth_h) * inv_freq_h / cfg.rope_factor + smooth_h * inv_freq_h


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq_h: jax.Array) -> jax.Array:
    """Rotary embedding, half-split layout, as transformers' Llama applies it:
    x * cos + rotate_half(x) * sin, angles in fp32, cos and sin cast to x's dtype (a bf16
    model rotates in bf16, as Hugging Face and MaxText do; an fp32 one in fp32, bit for bit
    the explicit rotation). Rotating bf16 activations in fp32 would round once instead
    of at each step, before q and k are rounded to bf16 anyway, and its conversions
    slow the TPU compile down (docs/preflight.md)."""
    angle_BT1h = (positions_BT[..., None].astype(jnp.float32) * inv_freq_h)[:, :, None, :]
    cos_BT1h = jnp.cos(angle_BT1h).astype(x_BTNH.dtype)
    sin_BT1h = jnp.sin(angle_BT1h).astype(x_BTNH.dtype)
    cos_BT1H = jnp.concatenate([cos_BT1h, cos_BT1h], axis=-1)
    sin_BT1H = jnp.concatenate([sin_BT1h, sin_BT1h], axis=-1)
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    return x_BTNH * cos_BT1H + jnp.concatenate([-x2, x1], axis=-1) * sin_BT1H


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def embed(table_VD: jax.Array, ids_BT: jax.Array, dtype, constrain: Constrain,
          table_axes: tuple = ("vocab", "embed")) -> jax.Array:
    """Rows `ids_BT` of an embedding table (V, D) with logical axes `table_axes`, in the
    compute dtype: (B, T, D).

    The same values as take-then-cast, and the same gradient (the cotangent cast to the
    table's dtype, scatter-added there), with the communication in the compute dtype:
    the table is cast while still laid out as the parameter, and in the backward pass
    the bf16 cotangent is moved to the table's layout of D ("embed": split over fsdp
    by FSDP rules) before it is cast to fp32 and added up. Without this, FSDP moves the
    fp32 cotangent (twice the bytes of the lookup's own all-to-all).

    The looked-up rows keep the table's layout of D at first (batch and length wherever
    the partitioner likes); the caller's constraint to the activation layout is then a
    plain reshard. Asked to produce the batch layout from the gather itself, the
    partitioner cannot get there when D and the batch share the fsdp axis and the
    vocabulary is split too (FSDP x TP): it replicates the rows. With the length split
    over context axes that also split the table's D (context parallelism), every shard
    looks up the whole sequence's ids in its slice of D, and the rows move to the length
    layout first ("rows_embed": D less the context axes), then to the batch layout: two
    all-to-alls of bf16 rows. Neither the table nor its fp32 gradient is ever gathered
    over the context axes (1.5 GiB per chip for Llama-3's 128k vocabulary)."""
    split = _length_split(constrain)
    table_VD = constrain(table_VD.astype(dtype), table_axes)
    if split:
        ids_BT = constrain(ids_BT, ("act_ids", None))
    rows_BTD = constrain(jnp.take(table_VD, ids_BT, axis=0), ("*", "*", table_axes[1]))
    return constrain(rows_BTD, ("*", "act_length", "rows_embed")) if split else rows_BTD


def _length_split(constrain: Constrain) -> bool:
    """Whether the activations' length is split (context parallelism). Without it the
    lookup lets the partitioner place the ids (an explicit layout for them cost 1.25 GiB
    per chip on Llama-3-8B, v5e-256 FSDP)."""
    return getattr(constrain, "ways", lambda _: 1)("act_length") > 1


def _embed_fwd(table_VD, ids_BT, dtype, constrain, table_axes):
    # the table as a residual costs nothing: it is a parameter, alive all step anyway
    return embed(table_VD, ids_BT, dtype, constrain, table_axes), (table_VD, ids_BT)


def _embed_bwd(dtype, constrain, table_axes, residuals, g_BTD):
    table_VD, ids_BT = residuals
    # D laid out as the table's; batch and length wherever the partitioner likes. The
    # scatter-add then needs every id beside its cotangent row: where D takes a batch
    # axis (FSDP), "act_ids" replicates the ids (small ints) to meet the rows, rather
    # than the rows being resharded to meet the ids (which under FSDP x TP the
    # partitioner can only do by replicating them); otherwise they stay as the batch.
    if _length_split(constrain):
        g_BTD = constrain(g_BTD, ("*", "act_length", "rows_embed"))
    g_BTD = constrain(g_BTD, ("*", "*", table_axes[1]))
    ids_BT = constrain(ids_BT, ("act_ids", None))
    zeros_VD = constrain(jnp.zeros_like(table_VD), table_axes)
    grad_VD = zeros_VD.at[ids_BT].add(g_BTD.astype(table_VD.dtype))
    return constrain(grad_VD, table_axes), None


embed.defvjp(_embed_fwd, _embed_bwd)


def for_compute(w: jax.Array, axes: Sequence[str | None], dtype, constrain: Constrain,
                gather: bool = True) -> jax.Array:
    """A weight as a matmul uses it: cast to the compute dtype while still laid out as the
    parameter (FSDP then moves bf16, not fp32), then gathered explicitly along its
    FSDP-sharded "embed" axis, once per use (the TPU compiler otherwise streams a weight
    through collective-permute rings once per matmul that reads it).

    Its gradient goes straight to the parameter's layout, so the partitioner can
    reduce-scatter the matmul's partial sums (the TPU compiler does on v5p). Autodiff
    would transpose the gather's constraint into one on the gradient, which makes the
    partitioner all-reduce the whole gradient on every device and then keep a slice:
    twice the traffic (docs/preflight.md, item 9). Without `gather`, only cast (a layer
    that gathers the weight itself, inside shard_map)."""
    if not gather:
        return constrain(w.astype(dtype), axes)
    return _gathered(w, tuple(axes), jnp.dtype(dtype), constrain, w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _gathered(w, axes, dtype, constrain, param_dtype):
    w = constrain(w.astype(dtype), axes)
    return constrain(w, tuple(None if a in ("embed", "expert_embed") else a for a in axes))


def _gathered_fwd(w, axes, dtype, constrain, param_dtype):
    return _gathered(w, axes, dtype, constrain, param_dtype), None


def _gathered_bwd(axes, dtype, constrain, param_dtype, residuals, g):
    return (constrain(g, axes).astype(param_dtype),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def attention_impl(cfg: ModelConfig, platform: str, length: int) -> str:
    """`auto` is cuDNN's fused kernel on GPUs (half precision only), the Pallas splash
    kernel on TPUs (sequences a multiple of 128), blocked attention (models/attention.py)
    elsewhere."""
    if cfg.attention != "auto":
        return cfg.attention
    if platform == "gpu":
        half = cfg.dtype in ("bfloat16", "float16")
        return "cudnn" if half and cfg.head_size % 8 == 0 else "blocked"
    return "splash" if platform == "tpu" and splash_fits(length) else "blocked"


def context_kernel(cfg: ModelConfig, platform: str, chunk: int) -> str:
    """Attention inside a shard of a context-split sequence (chunks of `chunk` tokens):
    the splash kernel where `auto` picks it (TPUs) or it is asked for, blocked attention
    otherwise (GPUs, CPUs)."""
    splash = splash_fits(chunk) and attention_impl(cfg, platform, chunk) == "splash"
    return "splash" if splash else "blocked"


def per_shard(constrain: Constrain, fn: Callable, args: Sequence[jax.Array],
              logical_axes: Sequence[Sequence[str | None]]) -> jax.Array:
    """fn on each device's shard (the caller's mesh; see ActivationSharding.per_shard), or
    on the whole arrays when there is no mesh."""
    local = getattr(constrain, "per_shard", None)
    return fn(*args) if local is None else local(fn, args, logical_axes)


def _bias(p: Mapping[str, jax.Array], name: str, dtype) -> jax.Array | float:
    return p[name].astype(dtype) if name in p else 0.0


def qkv(cfg: ModelConfig, p: Mapping[str, jax.Array], h_BTD: jax.Array,
        positions_BT: jax.Array, constrain: Constrain, key: jax.Array | None = None
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries (B, T, N, H), keys and values (B, T, K, H); RoPE applied (Llama). `key`:
    the LoRA adapters' dropout (training)."""
    dt = h_BTD.dtype
    q_BTNH = lora.project(cfg, p, "wq", h_BTD, "btd,dnh->btnh", key) + _bias(p, "q_bias", dt)
    k_BTKH = lora.project(cfg, p, "wk", h_BTD, "btd,dkh->btkh", key) + _bias(p, "k_bias", dt)
    v_BTKH = lora.project(cfg, p, "wv", h_BTD, "btd,dkh->btkh", key) + _bias(p, "v_bias", dt)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's H, before RoPE
        q_BTNH = norm(q_BTNH, p["q_norm_scale"], None, cfg.norm_eps)
        k_BTKH = norm(k_BTKH, p["k_norm_scale"], None, cfg.norm_eps)
    if cfg.style == "llama":
        inv_freq_h = rope_frequencies(cfg)
        q_BTNH = rope(q_BTNH, positions_BT, inv_freq_h)
        k_BTKH = rope(k_BTKH, positions_BT, inv_freq_h)
    return (constrain(q_BTNH, ("batch", "act_length", "act_heads", None)),
            constrain(k_BTKH, ("batch", "act_length", "act_kv_heads", None)),
            constrain(v_BTKH, ("batch", "act_length", "act_kv_heads", None)))


def attention_out(cfg: ModelConfig, p: Mapping[str, jax.Array], out_BTNH: jax.Array,
                  constrain: Constrain, key: jax.Array | None = None) -> jax.Array:
    """The heads' outputs (B, T, N, H) projected back to (B, T, D)."""
    dt = out_BTNH.dtype
    out_BTNH = constrain(out_BTNH, ("batch", "act_length", "act_heads", None))
    out_BTD = lora.project(cfg, p, "wo", out_BTNH, "btnh,nhd->btd", key)
    return out_BTD + _bias(p, "o_bias", dt)


def attention(cfg: ModelConfig, p: Mapping[str, jax.Array], h_BTD: jax.Array,
              positions_BT: jax.Array, constrain: Constrain,
              segment_ids_BT: jax.Array | None = None, cache: KVCache | None = None,
              layer: int | jax.Array = 0, key: jax.Array | None = None
              ) -> tuple[jax.Array, KVCache | None]:
    """Causal self-attention; with segment ids (packed documents), a token attends only
    to earlier tokens of its own segment. With a KV cache, this call's keys and values
    are written into layer `layer` of it and the queries attend to the cached slots;
    the updated cache is returned (None without one). `key`: LoRA dropout."""
    q_BTNH, k_BTKH, v_BTKH = qkv(cfg, p, h_BTD, positions_BT, constrain, key)
    if cache is not None:
        cache = cache.write(layer, k_BTKH, v_BTKH, constrain)
        k_BSKH, v_BSKH = cache.layer(layer)
        out_BTNH = cached_attention(q_BTNH, k_BSKH, v_BSKH, cache.slots(q_BTNH.shape[1]),
                                    cache.pad_B)
        return attention_out(cfg, p, out_BTNH, constrain, key), cache
    platform = getattr(constrain, "platform", jax.default_backend())
    if _length_split(constrain):  # context parallel
        ways = constrain.ways("act_length")
        kernel = context_kernel(cfg, platform, q_BTNH.shape[1] // (2 * ways))
        out_BTNH = context_attention(cfg.context_attention, q_BTNH, k_BTKH, v_BTKH,
                                     positions_BT, segment_ids_BT, cfg.attention_block,
                                     functools.partial(per_shard, constrain),
                                     constrain.mesh_axes("act_length"), ways, kernel,
                                     interpret=platform != "tpu")
        return attention_out(cfg, p, out_BTNH, constrain, key), None
    impl = attention_impl(cfg, platform, q_BTNH.shape[1])
    if segment_ids_BT is not None and impl == "cudnn":
        impl = "blocked"  # the cuDNN path is not verified with masks here
    if impl == "splash":  # a kernel per device: batch and heads split, whole sequences
        args = [q_BTNH, k_BTKH, v_BTKH] + ([] if segment_ids_BT is None else [segment_ids_BT])
        axes = [("batch", None, "act_heads", None)] + [("batch", None, "act_kv_heads", None)] * 2
        from models.splash import splash_attention
        interpret = platform != "tpu"  # the kernel's Python on other backends (tests)
        out_BTNH = per_shard(constrain, lambda q, k, v, *s: splash_attention(
            q, k, v, s[0] if s else None, interpret), args, axes + [("batch", None)])
    elif impl == "blocked":
        out_BTNH = blocked_attention(q_BTNH, k_BTKH, v_BTKH, cfg.attention_block,
                                     segment_ids_BT)
    else:
        mask_B1TS = None if segment_ids_BT is None else (
            segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
        out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TS,
                                                is_causal=True, implementation=impl)
    return attention_out(cfg, p, out_BTNH, constrain, key), None


# SwiGLU's activation silu(gate) * up, computed in fp32 and rounded once to the compute
# dtype (a bf16 chain rounds after every op; on CPUs each op is wrapped in converts). The
# backward keeps only the bf16 inputs and works in fp32 too.
@jax.custom_vjp
def swiglu_f32(gate_BTF: jax.Array, up_BTF: jax.Array) -> jax.Array:
    f32 = jnp.float32
    return (jax.nn.silu(gate_BTF.astype(f32)) * up_BTF.astype(f32)).astype(gate_BTF.dtype)


def _swiglu_fwd(gate_BTF, up_BTF):
    return swiglu_f32(gate_BTF, up_BTF), (gate_BTF, up_BTF)


def _swiglu_bwd(res, d_BTF):
    return swiglu_f32_grads(*res, d_BTF)


def swiglu_f32_grads(gate_BTF: jax.Array, up_BTF: jax.Array, d_BTF: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """swiglu_f32's gradients (gate, up) for the output gradient d_BTF."""
    g, u, d = (x.astype(jnp.float32) for x in (gate_BTF, up_BTF, d_BTF))
    sig = jax.nn.sigmoid(g)
    d_gate = d * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig + g sig (1 - sig)
    return d_gate.astype(gate_BTF.dtype), (d * g * sig).astype(up_BTF.dtype)


swiglu_f32.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.checkpoint
def gelu_f32(up_BTF: jax.Array) -> jax.Array:
    return jax.nn.gelu(up_BTF.astype(jnp.float32), approximate=True).astype(up_BTF.dtype)


def swiglu_mlp(h_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array,
               w_out_FD: jax.Array, constrain: Constrain) -> jax.Array:
    """Llama's MLP: (silu(h W_gate) * h W_up) W_out, (B, T, D) -> (B, T, D)."""
    dt = h_BTD.dtype
    gate_BTF = jnp.einsum("btd,df->btf", h_BTD, w_gate_DF.astype(dt))
    up_BTF = jnp.einsum("btd,df->btf", h_BTD, w_up_DF.astype(dt))
    act_BTF = constrain(swiglu_f32(gate_BTF, up_BTF), ("batch", "act_length", "act_mlp"))
    return jnp.einsum("btf,fd->btd", act_BTF, w_out_FD.astype(dt))


def mlp(cfg: ModelConfig, p: Mapping[str, jax.Array], h_BTD: jax.Array,
        constrain: Constrain, key: jax.Array | None = None) -> jax.Array:
    """The dense MLP: Llama's SwiGLU (swiglu_mlp) or GPT-2's GELU; `key`: LoRA dropout."""
    dt = h_BTD.dtype
    if cfg.style == "llama":
        gate_BTF = lora.project(cfg, p, "w_gate", h_BTD, "btd,df->btf", key)
        up_BTF = lora.project(cfg, p, "w_up", h_BTD, "btd,df->btf", key)
        act_BTF = constrain(swiglu_f32(gate_BTF, up_BTF), ("batch", "act_length", "act_mlp"))
        return lora.project(cfg, p, "w_out", act_BTF, "btf,fd->btd", key)
    up_BTF = lora.project(cfg, p, "w_in", h_BTD, "btd,df->btf", key) + _bias(p, "in_bias", dt)
    act_BTF = constrain(gelu_f32(up_BTF), ("batch", "act_length", "act_mlp"))
    out_BTD = lora.project(cfg, p, "w_out", act_BTF, "btf,fd->btd", key)
    return out_BTD + _bias(p, "out_bias", dt)
