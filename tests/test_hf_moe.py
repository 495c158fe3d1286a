"""Hugging Face interop of the mixture-of-experts families against `transformers` itself
(CPU torch): random small Mixtral and Qwen3-MoE models (q/k norms, a dense first layer,
top-k weights renormalised or not) are saved, imported onto an expert x FSDP x tensor
parallel mesh, and must give transformers' logits and greedy continuations; exports
must load back into transformers with the same logits and the Hub's tensor names. The
fused expert layout transformers 5 holds in memory imports as the Hub's per-expert one."""

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the Python 3.12 CI run leaves torch tests out")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from models.config import ModelConfig, MoeConfig  # noqa: E402
from train.errors import ConversionError  # noqa: E402
from train.hf import family_for, model_config  # noqa: E402
from train.hf.convert import hf_to_ckpt  # noqa: E402
from train.inference import load  # noqa: E402

from helpers import (  # noqa: E402
    hf_round_trip,
    hf_tokens,
    padded_spec,
    randomized,
    run_cli,
    small_config,
    torch_logits,
)

VOCAB = 300  # padded to 384 on import
MESH = ["mesh.fsdp=2", "mesh.expert=2", "mesh.model=2", "sharding.rules=fsdp_tp_ep"]
FP32 = ["model.dtype=float32"]
SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2)


def mixtral_config(**changes):
    return transformers.MixtralConfig(**{**SIZES, "intermediate_size": 32,
                                         "num_local_experts": 8, "rope_theta": 1e6,
                                         "router_aux_loss_coef": 0.02, **changes})


def qwen3_config(**changes):
    return transformers.Qwen3MoeConfig(**{**SIZES, "intermediate_size": 128,
                                          "moe_intermediate_size": 32, "num_experts": 8,
                                          "head_dim": 16, **changes})


MODELS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(mixtral_config()),
    "qwen3-moe-dense-first": lambda: transformers.Qwen3MoeForCausalLM(qwen3_config(
        mlp_only_layers=[0], norm_topk_prob=False)),
    "qwen3-moe-renormalised-tied": lambda: transformers.Qwen3MoeForCausalLM(qwen3_config(
        norm_topk_prob=True, tie_word_embeddings=True)),
}


def tensor_names(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="np") as f:
        return set(f.keys())


# the renormalised, tied Qwen3-MoE is checked against transformers in the layout test
@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe-dense-first"])
def test_import_matches_transformers(kind, tmp_path, devices):
    """Also: the experts are split over the expert axis, and the export is in the Hub
    layout (one tensor per expert, as save_pretrained writes)."""
    ref = randomized(MODELS[kind]())
    loaded, saved = hf_round_trip(ref, tmp_path, small_config(*MESH), FP32, 384, 16)
    m = loaded.cfg.model
    assert m.moe.num_experts == 8 and m.moe.aux_loss_coef == ref.config.router_aux_loss_coef
    assert m.moe.first_dense_layers == (kind == "qwen3-moe-dense-first")
    w_gate = loaded.model.moe_blocks.w_gate.get_value()
    assert padded_spec(w_gate) == (None, "expert", "fsdp", "model")  # (L, E, D, Fe)
    assert tensor_names(tmp_path / "back") == tensor_names(tmp_path / "hf")
    assert saved["router_aux_loss_coef"] == m.moe.aux_loss_coef


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe-renormalised-tied"])
def test_fused_layout_imports_as_the_hub_layout(kind, tmp_path, devices):
    """save_pretrained writes the Hub layout (transformers 5 reverts its fusion); with
    save_original_format=False it writes the fused tensors the model holds."""
    ref = randomized(MODELS[kind]())
    ref.save_pretrained(tmp_path / "hub")
    ref.save_pretrained(tmp_path / "fused", save_original_format=False)
    fused = tensor_names(tmp_path / "fused")
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused
    assert not any(".experts.0." in name for name in fused)
    user = small_config()
    params = {}
    for layout in ("hub", "fused"):
        hf_to_ckpt(str(tmp_path / layout), str(tmp_path / f"ours-{layout}"), user, FP32)
        loaded = load(str(tmp_path / f"ours-{layout}"), user, FP32)
        params[layout] = {k: np.asarray(v) for k, v in loaded.model.moe_blocks.stacked().items()}
    assert params["hub"].keys() == params["fused"].keys()
    for name, hub in params["hub"].items():
        np.testing.assert_array_equal(params["fused"][name], hub, err_msg=name)
    ids = hf_tokens(VOCAB, 8, 16)  # the batch splits 8 ways
    np.testing.assert_allclose(np.asarray(loaded.model(ids))[..., :VOCAB],
                               torch_logits(ref, ids), rtol=1e-4, atol=1e-4)


def qwen3_dict(**changes) -> dict:
    return {**qwen3_config().to_dict(), "architectures": ["Qwen3MoeForCausalLM"], **changes}


def mixtral_dict(**changes) -> dict:
    return {**mixtral_config().to_dict(), "architectures": ["MixtralForCausalLM"], **changes}


@pytest.mark.parametrize("hf, message", [
    (mixtral_dict(sliding_window=16), "Mixtral sliding_window=16 (sliding-window attention) "
     "is not supported; allowed: null or >= max_position_embeddings=64"),
    (mixtral_dict(router_jitter_noise=0.1), "Mixtral router_jitter_noise=0.1 is not supported"),
    (mixtral_dict(hidden_act="gelu"), "Mixtral hidden_act='gelu' is not supported (silu only)"),
    (mixtral_dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     "RoPE scaling 'yarn' is not supported (supported: none, llama3)"),
    (qwen3_dict(use_sliding_window=True, sliding_window=32),
     "Qwen3-MoE with use_sliding_window=true: sliding_window=32"),
    (qwen3_dict(attention_bias=True), "Qwen3-MoE with attention_bias=true is not supported"),
    (qwen3_dict(mlp_only_layers=[1]), "Qwen3-MoE with dense layers [1] (mlp_only_layers=[1], "
     "decoder_sparse_step=1) is not supported; allowed: the first K < num_hidden_layers "
     "layers dense (mlp_only_layers=[0, ..., K-1], decoder_sparse_step=1)"),
    (qwen3_dict(num_hidden_layers=4, decoder_sparse_step=2), "dense layers [0, 2]"),
    (qwen3_dict(mlp_only_layers=[0, 1]), "dense layers [0, 1]"),
    (qwen3_dict(shared_expert_intermediate_size=64), "Qwen3-MoE with "
     "shared_expert_intermediate_size=64 (shared experts) is not supported; allowed: 0"),
])
def test_unsupported_hf_configs_are_refused(hf, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        model_config(hf)


def test_supported_edge_configs():
    # a window that holds every position is plain causal attention
    assert model_config(mixtral_dict(sliding_window=64))["moe"]["norm_topk_prob"] is True
    assert model_config(qwen3_dict(use_sliding_window=True, sliding_window=None))["qk_norm"]
    # every second layer sparse in 2 layers: layer 0 dense, a prefix
    moe = model_config(qwen3_dict(decoder_sparse_step=2))["moe"]
    assert moe["first_dense_layers"] == 1 and moe["expert_mlp_dim"] == 32


@pytest.mark.parametrize("m, message", [
    (ModelConfig(qk_norm=True, qkv_bias=True), "no Hugging Face family holds a "
     "model.style=llama model with model.qk_norm=true, model.qkv_bias=true and 0 experts"),
    (ModelConfig(moe=MoeConfig(num_experts=4, first_dense_layers=1)),
     "Mixtral has no dense layers; model.moe.first_dense_layers=1 cannot be exported"),
    (ModelConfig(moe=MoeConfig(num_experts=4, norm_topk_prob=False)),
     "model.moe.norm_topk_prob=false cannot be exported"),
    (ModelConfig(qk_norm=True, moe=MoeConfig(num_experts=4, shared_experts=1)),
     "Qwen3-MoE has no shared experts; model.moe.shared_experts=1 cannot be exported"),
])
def test_unexportable_models_are_refused(m, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        family_for(m).hf_config(m, 100, None, None)


def test_unsupported_config_is_one_line_from_the_cli(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(qwen3_dict(mlp_only_layers=[1])))
    proc = run_cli("hf-to-ckpt", str(tmp_path), str(tmp_path / "out"), module="train.convert")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: Qwen3-MoE with dense layers [1] (mlp_only_layers=[1]")
