"""Hugging Face interop against `transformers` itself (CPU torch): random small Llama
(grouped-query attention, Llama-3.1 RoPE scaling, tied and untied heads) and GPT-2
models are saved, imported onto a 2x2x2 mesh, and must give transformers' logits and
greedy continuations; exports must load back into transformers with the same logits."""

import json

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the Python 3.12 CI run leaves torch tests out")
transformers = pytest.importorskip("transformers")

from train.errors import ConversionError  # noqa: E402
from train.hf.convert import hf_to_ckpt  # noqa: E402
from train.inference import load  # noqa: E402

from helpers import (  # noqa: E402
    hf_round_trip,
    padded_spec,
    randomized,
    run_cli,
    small_config,
    torch_logits,
)

VOCAB = 100  # padded to 128 on import
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.model=2", "sharding.rules=fsdp_tp"]
FP32 = ["model.dtype=float32"]


def hf_llama(tie: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    return transformers.LlamaForCausalLM(cfg)


def hf_gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2,
                                  n_head=4, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2)


def hf_qwen2():
    """Qwen2.5's architecture: q/k/v biases; its window setting carried but unused."""
    cfg = transformers.Qwen2Config(**SHAPES, rope_theta=1e6, tie_word_embeddings=True,
                                   use_sliding_window=False, sliding_window=16)
    return transformers.Qwen2ForCausalLM(cfg)


def hf_qwen3():
    """Dense Qwen3: q/k norms and a head size of its own (16, not 64 / 8)."""
    cfg = transformers.Qwen3Config(**SHAPES, head_dim=16, tie_word_embeddings=False,
                                   use_sliding_window=False, sliding_window=16)
    return transformers.Qwen3ForCausalLM(cfg)


def hf_mistral():
    """A sliding window (32) shorter than max_position_embeddings: imported as the
    model's longest sequence, where the window is plain causal attention."""
    cfg = transformers.MistralConfig(**SHAPES, sliding_window=32)
    return transformers.MistralForCausalLM(cfg)


MODELS = {"llama": lambda: hf_llama(False), "llama-tied": lambda: hf_llama(True),
          "gpt2": hf_gpt2, "qwen2": hf_qwen2, "qwen3": hf_qwen3, "mistral": hf_mistral}


@pytest.mark.parametrize("kind", list(MODELS))
def test_import_matches_transformers(kind, tmp_path, devices):
    """Also: every weight is laid out on the mesh as it is read, never whole."""
    loaded, _ = hf_round_trip(randomized(MODELS[kind]()), tmp_path, small_config(*MESH), FP32,
                              128, 20)
    wq = loaded.model.blocks.wq.get_value()
    assert padded_spec(wq) == (None, "fsdp", "model", None)
    assert len(wq.addressable_shards[0].data.flatten()) == wq.size // 4  # never whole


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {"architectures": ["FalconForCausalLM"], "vocab_size": 10}))
    with pytest.raises(ConversionError, match="FalconForCausalLM.*supported: LlamaForCausalLM, "
                                           "GPT2LMHeadModel, MixtralForCausalLM, "
                                           "Qwen3MoeForCausalLM, Qwen2ForCausalLM, "
                                           "Qwen3ForCausalLM, MistralForCausalLM"):
        hf_to_ckpt(str(tmp_path / "hf"), str(tmp_path / "out"), small_config(), [])
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ConversionError) as err:
        hf_to_ckpt(str(tmp_path / "hf"), str(tmp_path / "out"), small_config(), [])
    assert str(err.value) == (f"{tmp_path / 'hf' / 'config.json'} is not valid JSON (line 1: "
                              "Expecting property name enclosed in double quotes); download "
                              "the model's config.json again")


def test_our_run_exports_to_transformers(trained_run, tmp_path, devices):
    proc = run_cli("ckpt-to-hf", str(trained_run), str(tmp_path / "hf"), module="train.convert")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    # the embedded stdlib data has 256 byte tokens and no EOS token in the model
    assert hf_cfg["vocab_size"] == 256 and hf_cfg["eos_token_id"] is None
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    loaded = load(str(trained_run), small_config(), [])
    ids = np.random.default_rng(0).integers(0, 256, (8, 32))
    np.testing.assert_allclose(np.asarray(loaded.model(ids)), torch_logits(back, ids),
                               rtol=1e-4, atol=1e-4)


def test_convert_and_generate_clis_with_a_tokenizer(tmp_path):
    from train.data.tokenizer import load_tokenizer, train_bpe
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
    size = train_bpe(texts, 300, str(tmp_path / "hf" / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "hf" / "tokenizer.json"))
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        eos_token_id=tok.eos_id, bos_token_id=tok.eos_id))
    randomized(ref).save_pretrained(tmp_path / "hf")
    proc = run_cli("hf-to-ckpt", str(tmp_path / "hf"), str(tmp_path / "ours"),
                   "model.dtype=float32", module="train.convert")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "converted GPT2LMHeadModel" in proc.stdout
    assert (tmp_path / "ours" / "tokenizer.json").exists()

    prompt = "def add(a"
    gen = run_cli("--checkpoint", str(tmp_path / "ours"), "--prompt", prompt,
                  "--max-new-tokens", "12", module="train.generate")
    assert gen.returncode == 0, gen.stderr[-2000:]
    ids = tok.encode_prompts([prompt])[0]
    with torch.no_grad():
        new = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                           eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert gen.stdout.split("\n", 1)[1].startswith(prompt + tok.decode(new) + "\nprefill ")


def test_bad_conversions_are_one_line(tmp_path):
    proc = run_cli("hf-to-ckpt", str(tmp_path), str(tmp_path / "out"), module="train.convert")
    assert proc.returncode == 2 and "has no config.json" in proc.stderr.strip().splitlines()[-1]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "vocab_size": 10}))
    proc = run_cli("hf-to-ckpt", str(tmp_path), str(tmp_path / "out"), "n_embd=3",
                   module="train.convert")
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
