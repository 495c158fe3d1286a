"""A LoRA run's adapters as a PEFT adapter directory (`python -m train.convert
ckpt-to-peft CKPT_DIR OUT_DIR`): adapter_config.json and adapter_model.safetensors,
which `peft.PeftModel.from_pretrained(base, OUT_DIR)` loads onto the Hugging Face base
model the run started from.

PEFT keeps each adapted Linear's lora_A (r, in_features) and lora_B (out_features, r)
under `base_model.model.<module>.lora_{A,B}.weight`; ours are A (L, inputs..., r) and
B (L, r, outputs...) stacked over layers, flattened the way the family flattens the
weight itself (q: in d_model, out heads x head size). The scale is PEFT's lora_alpha /
r, so the two agree. Families whose attention weights Hugging Face fuses (GPT-2's
c_attn) cannot hold per-projection adapters and are refused.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from models import lora
from train.errors import ConversionError
from train.hf.tensors import _layers

HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
              "w_out": "mlp.down_proj"}
PREFIX = "base_model.model.model.layers.{l}."


def adapter_tensors(m, params) -> dict[str, np.ndarray]:
    """PEFT's tensor names and arrays (fp32) of our adapters (an nnx.State)."""
    out = {}
    for stack in ("blocks", "moe_blocks"):
        if stack not in params:
            continue
        for name, module in HF_MODULES.items():
            if name + lora.A not in params[stack]:
                continue
            a, b = (np.asarray(multihost_utils.process_allgather(
                params[stack][name + s].get_value(), tiled=True), np.float32)
                for s in (lora.A, lora.B))
            for i, layer in enumerate(_layers(stack + "/", m)):
                key = PREFIX.format(l=layer) + module
                a_in_r = a[i].reshape(-1, a.shape[-1])
                b_r_out = b[i].reshape(b.shape[1], -1)
                out[key + ".lora_A.weight"] = np.ascontiguousarray(a_in_r.T)
                out[key + ".lora_B.weight"] = np.ascontiguousarray(b_r_out.T)
    return out


def adapter_config(m, base: str | None, modules: list[str]) -> dict:
    """adapter_config.json: a LoRA of rank r, alpha and dropout as trained, on the
    adapted modules (by their full names, a regular expression PEFT matches whole)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": m.lora.rank,
            "lora_alpha": m.lora.alpha, "lora_dropout": m.lora.dropout, "bias": "none",
            "target_modules": "|".join(
                module.removeprefix("base_model.model.").replace(".", r"\.")
                for module in modules),
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base}


def write_adapter(loaded, out_dir: str) -> str:
    """Write the PEFT directory of a loaded LoRA run; returns the line to print."""
    cfg = loaded.cfg
    m = cfg.model
    if not m.lora.enabled:
        raise ConversionError(f"{loaded.where} has no LoRA adapters (model.lora.rank=0); "
                              "export the whole model with ckpt-to-hf")
    if m.style != "llama":
        raise ConversionError("ckpt-to-peft writes the Llama-like families' adapters; GPT-2's "
                              "fused c_attn cannot hold per-projection adapters (use "
                              "ckpt-to-hf, which merges them)")
    out = epath.Path(out_dir)
    if (out / "adapter_config.json").exists():
        raise ConversionError(f"{out_dir} already holds an adapter; choose another directory")
    from flax import nnx
    tensors = adapter_tensors(m, nnx.state(loaded.model, nnx.LoRAParam))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    source = (loaded.info.get("hf") or {}).get("source") or m.init_from
    base = source[len("hf:"):] if source and source.startswith("hf:") else source
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(adapter_config(m, base, modules),
                                                            indent=1))
    size = sum(math.prod(x.shape) for x in tensors.values())
    return (f"wrote {out_dir} (PEFT LoRA, rank {m.lora.rank}, alpha {m.lora.alpha:g}, "
            f"{len(modules)} modules, {size:,} parameters) from {loaded.where}; base: {base}")
