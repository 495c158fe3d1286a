"""Helpers the tests share (conftest.py only configures JAX and holds the fixtures)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from train.config import load_config
from train.step import loss_from_stats

REPO = Path(__file__).resolve().parent.parent

# A model small enough to compile in seconds, with every dimension divisible by 8 so
# each mesh up to 8 devices applies.
SMALL = ["model.num_layers=2", "model.d_model=64", "model.num_heads=8", "model.num_kv_heads=4",
         "model.mlp_dim=128", "model.max_seq_len=64", "model.dtype=float32",
         "train.seq_len=16", "train.batch_size=8", "data.source=synthetic",
         "compile_cache_dir=null"]


def small_config(*overrides: str):
    """configs/tiny.yaml shrunk further (SMALL) plus `overrides`."""
    return load_config(str(REPO / "configs" / "tiny.yaml"), SMALL + list(overrides))


def padded_spec(x) -> tuple:
    """An array's PartitionSpec as a tuple of its rank (jax 0.10 drops trailing Nones)."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def cli_env(devices: int = 8, **extra: str) -> dict:
    """The environment of a tool run as a subprocess. Where a compilation cache is set
    (CI: JAX_COMPILATION_CACHE_DIR), every program goes into it, not only those that took
    a second to compile: the suite's many runs of the same small configs start faster.
    XLA flags are the test process's (conftest.py), with `devices` fake CPU devices."""
    count = "--xla_force_host_platform_device_count"
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join([f"{count}={devices}", *inherited]), **extra)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def run_cli(*args: str, module: str = "train", devices: int = 8, timeout: int = 600,
            env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m <module> args...` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO,
                          env=env or cli_env(devices), capture_output=True, text=True,
                          timeout=timeout)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, z_loss: float,
                  weights_BT: jax.Array | None = None):
    """A reference next-token loss from full logits (what the chunked head must equal):
    train.step.loss_from_stats of the full logsumexp and the target logits."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return loss_from_stats(lse_BT, target_BT, z_loss, weights_BT)


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} read from TFRecord event files with the Event proto (not
    through the writer's own code)."""
    from tensorboardX.proto import event_pb2
    out: dict[str, dict[int, float]] = {}
    for path in log_dir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        i = 0
        while i < len(data):  # record: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def randomized(model):
    """A `transformers` model with every tensor random (transformers initializes norms
    to 1 and biases to 0), so a transposed or swapped weight cannot go unnoticed."""
    import torch
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def torch_logits(model, ids):
    """A `transformers` model's logits (numpy) on token ids (B, T)."""
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def hf_tokens(vocab: int, batch=4, length=24, seed=1):
    """Random token ids (batch, length) below `vocab`."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def hf_round_trip(ref, tmp_path, user, overrides, padded_vocab: int, new_tokens: int):
    """A `transformers` model saved, imported (train.hf.convert) and exported again,
    checked on the way: our logits equal its logits (1e-4, fp32) with zero padding
    columns up to `padded_vocab`, greedy continuations are the same `new_tokens`, and
    the export loads in transformers as the same class, with the unpadded vocabulary and
    the same logits (1e-6). Returns our loaded model and the export's config.json."""
    import json

    import numpy as np
    import torch
    import transformers

    from train.hf.convert import ckpt_to_hf, hf_to_ckpt
    from train.inference import Generator, load
    vocab = ref.config.vocab_size
    ref.save_pretrained(tmp_path / "hf")
    hf_to_ckpt(str(tmp_path / "hf"), str(tmp_path / "ours"), user, overrides)
    loaded = load(str(tmp_path / "ours"), user, overrides)

    ids = hf_tokens(vocab)
    ours = np.asarray(loaded.model(ids))
    assert ours.shape[-1] == padded_vocab and not ours[..., vocab:].any()  # zero padding rows
    np.testing.assert_allclose(ours[..., :vocab], torch_logits(ref, ids), rtol=1e-4, atol=1e-4)

    prompt = hf_tokens(vocab, 1, 8, seed=2)
    with torch.no_grad():
        want = ref.generate(torch.tensor(prompt), max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    gen = Generator(loaded.model, loaded.mesh, loaded.rules, eos_id=vocab, vocab_limit=vocab)
    assert gen.generate([prompt[0].tolist()], new_tokens).tokens[0] == want

    ckpt_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), user, overrides, None)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(ref)
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert saved["vocab_size"] == vocab
    np.testing.assert_allclose(torch_logits(back, ids), torch_logits(ref, ids),
                               rtol=1e-6, atol=1e-6)
    return loaded, saved


def save_small_hf(root: Path, config_cls, model_cls, **extra):
    """A random small model of a transformers family saved in `root` beside a BPE
    tokenizer.json of its own vocabulary, and some text (corpus.txt): (root, model)."""
    from train.data.tokenizer import train_bpe
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    size = train_bpe(texts, 300, str(root / "tokenizer.json"))
    cfg = config_cls(vocab_size=size, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                     max_position_embeddings=128, tie_word_embeddings=False, **extra)
    ref = randomized(model_cls(cfg))
    ref.save_pretrained(root)
    (root / "corpus.txt").write_text("\n".join(texts))
    return root, ref
