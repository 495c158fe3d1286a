"""Hugging Face checkpoints <-> our parameters: config.json and safetensors files of
Llama-family (LlamaForCausalLM) and GPT-2 (GPT2LMHeadModel) models.

Import builds each parameter straight onto the mesh (jax.make_array_from_callback:
every device receives only its shard), one parameter at a time, reading the layers'
tensors from the safetensors files (memory-mapped) on the host. Export gathers one
parameter at a time and writes safetensors shards that `transformers` loads.

Layouts. HF Linear weights are (out, in); ours are (in, ...): q (D, N, H), k/v (D, K, H),
o (N, H, D), MLP in (D, F), out (F, D), head (D, V). GPT-2's Conv1D weights are already
(in, out), and its c_attn holds q, k and v side by side. The vocabulary is padded to a
multiple of 128 (zero rows, never generated) and unpadded on export. Both use the
half-split RoPE layout, so no permutation of q/k is needed.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

import numpy as np
from etils import epath

SUPPORTED = ("LlamaForCausalLM", "GPT2LMHeadModel")
# model.* keys about how to compute, not shapes: an import takes them from --config
COMPUTE_KEYS = ("dtype", "param_dtype", "scan_layers", "remat", "attention", "attention_block",
                "vocab_chunks")


class ConvertError(ValueError):
    """An HF checkpoint we cannot convert: one line naming what was found."""


# ---------------------------------------------------------------- configs


def _rope(hf: dict) -> dict:
    """Our RoPE keys from HF's rope_theta / rope_scaling (transformers 4) or
    rope_parameters (transformers 5)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_len=int(params["original_max_position_embeddings"]))
    elif kind != "default":
        raise ConvertError(f"RoPE scaling {kind!r} is not supported (supported: none, llama3)")
    return out


def model_config(hf: dict, vocab_multiple: int = 128) -> dict:
    """Our model.* keys from an HF config.json."""
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    if arch not in SUPPORTED:
        raise ConvertError(f"HF architecture {arch!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED)}")
    V = hf["vocab_size"]
    padded = -(-V // vocab_multiple) * vocab_multiple
    if arch == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConvertError(f"GPT-2 activation {act!r} is not supported (gelu_new only)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise ConvertError("GPT-2 with scale_attn_by_inverse_layer_idx=true or "
                               "scale_attn_weights=false is not supported (1/sqrt(head size) "
                               "scaling only)")
        D = hf["n_embd"]
        return dict(style="gpt2", vocab_size=padded, num_layers=hf["n_layer"], d_model=D,
                    num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * D,
                    max_seq_len=hf["n_positions"], tie_embeddings=True,
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConvertError(f"Llama with {key}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"Llama activation {hf['hidden_act']!r} is not supported (silu)")
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or D // N
    return dict(style="llama", vocab_size=padded, num_layers=hf["num_hidden_layers"],
                d_model=D, num_heads=N, num_kv_heads=hf.get("num_key_value_heads") or N,
                head_dim=None if head_dim == D // N else head_dim,
                mlp_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                norm_eps=hf.get("rms_norm_eps", 1e-6), **_rope(hf))


def hf_config(m, vocab_size: int, eos_id: int | None, bos_id: int | None = None) -> dict:
    """An HF config.json for our ModelConfig `m`, with the unpadded vocabulary."""
    if m.style == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": vocab_size, "n_positions": m.max_seq_len, "n_embd": m.d_model,
                "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.mlp_dim,
                "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
                "tie_word_embeddings": True, "bos_token_id": bos_id, "eos_token_id": eos_id,
                "torch_dtype": "float32"}
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": vocab_size, "hidden_size": m.d_model, "intermediate_size": m.mlp_dim,
           "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
           "num_key_value_heads": m.kv_heads, "head_dim": m.head_size,
           "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
           "hidden_act": "silu", "rope_theta": m.rope_theta,
           "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}
    if m.rope_scaling == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_factor,
                               "low_freq_factor": m.rope_low_freq_factor,
                               "high_freq_factor": m.rope_high_freq_factor,
                               "original_max_position_embeddings": m.rope_original_max_len}
    return out


# ---------------------------------------------------------------- parameter mapping
# One entry per parameter of ours: (HF name, with {l} for the layer; to_ours(hf array,
# model config) -> our layer array; to_hf(our layer array, model config) -> hf array).
# Vocabulary padding is handled outside, on the "vocab" axis.

Mapping = dict[str, tuple[str, Callable, Callable]]


def _t(x, m):
    return x.T


def _same(x, m):
    return x


def llama_mapping(m) -> Mapping:
    N, K, H, D = m.num_heads, m.kv_heads, m.head_size, m.d_model
    at, p = "model.layers.{l}.self_attn.", "model.layers.{l}."
    out = {
        "embedding": ("model.embed_tokens.weight", _same, _same),
        "final_norm_scale": ("model.norm.weight", _same, _same),
        "blocks/attn_norm_scale": (p + "input_layernorm.weight", _same, _same),
        "blocks/mlp_norm_scale": (p + "post_attention_layernorm.weight", _same, _same),
        "blocks/wq": (at + "q_proj.weight", lambda x, m: x.T.reshape(D, N, H),
                      lambda x, m: x.reshape(D, N * H).T),
        "blocks/wk": (at + "k_proj.weight", lambda x, m: x.T.reshape(D, K, H),
                      lambda x, m: x.reshape(D, K * H).T),
        "blocks/wv": (at + "v_proj.weight", lambda x, m: x.T.reshape(D, K, H),
                      lambda x, m: x.reshape(D, K * H).T),
        "blocks/wo": (at + "o_proj.weight", lambda x, m: x.T.reshape(N, H, D),
                      lambda x, m: x.reshape(N * H, D).T),
        "blocks/w_gate": (p + "mlp.gate_proj.weight", _t, _t),
        "blocks/w_up": (p + "mlp.up_proj.weight", _t, _t),
        "blocks/w_out": (p + "mlp.down_proj.weight", _t, _t),
    }
    if not m.tie_embeddings:
        out["head"] = ("lm_head.weight", _t, _t)
    return out


def gpt2_mapping(m) -> Mapping:
    N, H, D = m.num_heads, m.head_size, m.d_model
    h = "h.{l}."

    def qkv(i, shape):  # slice i of c_attn's (in, 3 * out) weight or (3 * out,) bias
        return (lambda x, m: np.split(x, 3, axis=-1)[i].reshape(shape))

    out = {
        "embedding": ("wte.weight", _same, _same),
        "pos_embedding": ("wpe.weight", _same, _same),
        "final_norm_scale": ("ln_f.weight", _same, _same),
        "final_norm_bias": ("ln_f.bias", _same, _same),
        "blocks/attn_norm_scale": (h + "ln_1.weight", _same, _same),
        "blocks/attn_norm_bias": (h + "ln_1.bias", _same, _same),
        "blocks/mlp_norm_scale": (h + "ln_2.weight", _same, _same),
        "blocks/mlp_norm_bias": (h + "ln_2.bias", _same, _same),
        "blocks/wo": (h + "attn.c_proj.weight", lambda x, m: x.reshape(N, H, D),
                      lambda x, m: x.reshape(N * H, D)),
        "blocks/o_bias": (h + "attn.c_proj.bias", _same, _same),
        "blocks/w_in": (h + "mlp.c_fc.weight", _same, _same),
        "blocks/in_bias": (h + "mlp.c_fc.bias", _same, _same),
        "blocks/w_out": (h + "mlp.c_proj.weight", _same, _same),
        "blocks/out_bias": (h + "mlp.c_proj.bias", _same, _same),
    }
    for i, name in enumerate("qkv"):  # imports only: export joins them (export_tensors)
        out[f"blocks/w{name}"] = (h + "attn.c_attn.weight", qkv(i, (D, N, H)), None)
        out[f"blocks/{name}_bias"] = (h + "attn.c_attn.bias", qkv(i, (N, H)), None)
    return out


def mapping(m) -> Mapping:
    return gpt2_mapping(m) if m.style == "gpt2" else llama_mapping(m)


VOCAB_AXIS = {"embedding": 0, "head": 1}  # where our vocabulary-sized parameters pad


# ---------------------------------------------------------------- safetensors files


class Tensors:
    """The tensors of an HF directory's safetensors file(s), read lazily (memory-mapped).
    GPT-2 names may carry a "transformer." prefix or not."""

    def __init__(self, directory: str):
        from safetensors import safe_open
        d = epath.Path(directory)
        index = d / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (d / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            found = ", ".join(sorted(p.name for p in d.iterdir())[:8])
            raise ConvertError(f"{directory} has no model.safetensors (or index); found: "
                               f"{found or 'nothing'} (PyTorch .bin files: load and save them "
                               "with transformers' save_pretrained(safe_serialization=True))")
        self.where: dict[str, tuple[object, str]] = {}
        self.handles = [safe_open(str(d / f), framework="np") for f in files]
        for h in self.handles:
            for key in h.keys():
                self.where[key] = (h, key)
                if key.startswith("transformer."):
                    self.where.setdefault(key[len("transformer."):], (h, key))

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ConvertError(f"the checkpoint has no tensor {name!r}")
        handle, key = self.where[name]
        return handle.get_tensor(key)


def load_params(directory: str, m, target, param_dtype) -> "nnx.State":  # noqa: F821
    """Our parameters from the HF directory, each array built on its target sharding
    (`target`: the abstract params state, ShapeDtypeStructs with shardings)."""
    import jax
    from flax import nnx
    tensors, table = Tensors(directory), mapping(m)
    flat = []
    for path, var in nnx.to_flat_state(target):
        name = "/".join(map(str, path))
        if name not in table:
            raise ConvertError(f"no Hugging Face tensor maps to our parameter {name}")
        hf_name, to_ours, _ = table[name]
        spec = var.get_value()
        if "{l}" in hf_name:
            host = np.stack([to_ours(tensors.get(hf_name.format(l=i)), m)
                             for i in range(m.num_layers)])
        else:
            host = to_ours(tensors.get(hf_name), m)
        if name in VOCAB_AXIS:
            host = _pad(host, VOCAB_AXIS[name], spec.shape[VOCAB_AXIS[name]])
        if name == "pos_embedding" and host.shape[0] != spec.shape[0]:
            raise ConvertError(f"wpe has {host.shape[0]} positions, the model {spec.shape[0]}")
        if host.shape != spec.shape:
            raise ConvertError(f"{hf_name} gives shape {host.shape} for our {name}, expected "
                               f"{spec.shape}")
        host = np.asarray(host, dtype=param_dtype)
        value = jax.make_array_from_callback(spec.shape, spec.sharding, lambda i: host[i])
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


def _pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    if x.shape[axis] > size:
        raise ConvertError(f"vocabulary of {x.shape[axis]} does not fit model.vocab_size={size}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)


def export_tensors(m, params, vocab_size: int) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) pairs of our params (an nnx.State), gathered to the host one
    parameter at a time (GPT-2's q, k, v together), vocabulary unpadded to `vocab_size`."""
    from flax import nnx
    from jax.experimental import multihost_utils

    def gather(name):
        node = params
        for key in name.split("/"):
            node = node[key]
        x = np.asarray(multihost_utils.process_allgather(node.get_value(), tiled=True))
        if name in VOCAB_AXIS:
            x = np.take(x, np.arange(vocab_size), axis=VOCAB_AXIS[name])
        return x

    table = mapping(m)
    for path, _ in nnx.to_flat_state(params):
        name = "/".join(map(str, path))
        hf_name, _, to_hf = table[name]
        if to_hf is None:
            continue
        x = gather(name)
        if "{l}" not in hf_name:
            yield hf_name, to_hf(x, m)
            continue
        for i in range(m.num_layers):
            yield hf_name.format(l=i), to_hf(x[i], m)
    if m.style == "gpt2":  # c_attn: q, k and v side by side
        N, H, D, L = m.num_heads, m.head_size, m.d_model, m.num_layers
        w = [gather(f"blocks/w{c}").reshape(L, D, N * H) for c in "qkv"]
        b = [gather(f"blocks/{c}_bias").reshape(L, N * H) for c in "qkv"]
        for i in range(L):
            yield f"h.{i}.attn.c_attn.weight", np.concatenate([x[i] for x in w], axis=1)
            yield f"h.{i}.attn.c_attn.bias", np.concatenate([x[i] for x in b])


def write_safetensors(directory: str, tensors: Iterator[tuple[str, np.ndarray]],
                      max_shard_bytes: int = 4 << 30) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards (each written as
    soon as it is full) plus the index transformers reads."""
    from safetensors.numpy import save_file
    d = epath.Path(directory)
    written: list[tuple[str, list[str], int]] = []  # (temporary file, names, bytes)
    current: dict[str, np.ndarray] = {}

    def flush():
        tmp = f".shard-{len(written)}.safetensors"
        save_file(current, str(d / tmp), metadata={"format": "pt"})
        written.append((tmp, list(current), sum(x.nbytes for x in current.values())))
        current.clear()

    for name, x in tensors:
        x = np.ascontiguousarray(x)
        if current and sum(v.nbytes for v in current.values()) + x.nbytes > max_shard_bytes:
            flush()
        current[name] = x
    flush()
    if len(written) == 1:
        (d / written[0][0]).rename(d / "model.safetensors")
        return ["model.safetensors"]
    weight_map, names = {}, []
    for i, (tmp, keys, _) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (d / tmp).rename(d / fname)
        weight_map.update({k: fname for k in keys})
        names.append(fname)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(w[2] for w in written)}, "weight_map": weight_map},
        indent=1))
    return names
