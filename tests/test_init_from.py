"""model.init_from: a run's initial weights from a Hugging Face directory (checked
against `transformers` itself), an export or another run; the model's shapes and
tokenizer from the source, the run's own checkpoints winning over it."""

import json

import jax
import numpy as np
import pytest

from train.checkpoint import start_state
from train.config import load_config
from train.errors import ConfigError
from train.init_from import initial_params
from train.plan import plan

from helpers import REPO, run_cli, save_small_hf, torch_logits

FINETUNE = str(REPO / "configs" / "finetune.yaml")
SMALL = ["model.dtype=float32", "train.seq_len=32", "train.batch_size=8", "mesh.data=2",
         "mesh.fsdp=2", "mesh.model=2", "sharding.rules=fsdp_tp", "compile_cache_dir=null",
         "optimizer.lr=1e-3", "optimizer.warmup_steps=1"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random small Qwen2 saved by transformers beside a BPE tokenizer.json of its own
    vocabulary, and some text: (directory, the transformers model)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    return save_small_hf(tmp_path_factory.mktemp("hf"), transformers.Qwen2Config,
                         transformers.Qwen2ForCausalLM, use_sliding_window=False,
                         sliding_window=128)


def test_hf_init_from_takes_weights_shapes_and_tokenizer_from_the_directory(hf_dir, devices):
    """The first state holds transformers' weights, laid out on the mesh (logits within
    1e-4 of transformers'), a fresh optimizer state at step 0; the model's sizes and the
    tokenizer come from the directory, how to compute from the user's config."""
    root, ref = hf_dir
    cfg = load_config(FINETUNE, [f"model.init_from=hf:{root}", f"data.path={root}/corpus.txt",
                                 *SMALL])
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_kv_heads, m.qkv_bias, m.tie_embeddings,
            m.max_seq_len, m.vocab_size) == (2, 64, 2, True, False, 128, 384)
    assert (m.remat, m.dtype) == ("full", "float32")  # the user's
    assert cfg.data.tokenizer == f"{root}/tokenizer.json"
    p = plan(cfg)
    state, start, _ = start_state(p, None, None, initial_params(cfg, p))
    assert start == 0 and int(state.step) == 0
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(state.opt_state))
    wq = state.params["blocks"]["wq"].get_value()
    assert len(wq.addressable_shards[0].data.flatten()) == wq.size // 4  # never whole
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, (4, 24))
    ours = np.asarray(state.model()(ids))[..., :ref.config.vocab_size]
    np.testing.assert_allclose(ours, torch_logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_a_shape_key_that_contradicts_the_source_is_one_line(hf_dir):
    root, _ = hf_dir
    with pytest.raises(ConfigError) as err:
        load_config(FINETUNE, [f"model.init_from=hf:{root}", f"data.path={root}/corpus.txt",
                               "model.num_layers=4", *SMALL])
    assert str(err.value) == (f"model.num_layers=4 contradicts model.init_from=hf:{root}, "
                              "whose num_layers is 2; leave model.num_layers out (the source "
                              "sets the model's shape)")
    with pytest.raises(ConfigError, match="embedded byte corpus.*set data.path"):
        load_config(FINETUNE, [f"model.init_from=hf:{root}", *SMALL])
    with pytest.raises(ConfigError, match=r"model.init_from=hf:/nonexistent: "
                                          r"/nonexistent/config.json does not exist"):
        load_config(FINETUNE, ["model.init_from=hf:/nonexistent", *SMALL])


@pytest.mark.once
def test_fine_tuning_from_hf_resumes_its_own_checkpoint_and_exports_to_the_source_family(
        hf_dir, tmp_path, devices):
    """`python -m train` from hf:DIR trains and checkpoints; rerun with more steps it
    resumes its own checkpoint (not the source's weights); `train.convert ckpt-to-hf`
    writes the source's architecture and vocabulary, which transformers loads with our
    logits."""
    transformers = pytest.importorskip("transformers")
    from train.inference import load
    root, ref = hf_dir
    out = tmp_path / "run"
    args = ["--config", FINETUNE, f"model.init_from=hf:{root}",
            f"data.path={root}/corpus.txt", f"data.cache_dir={tmp_path}/cache",
            f"output_dir={out}", "checkpoint.every_steps=2", "eval.every_steps=0", *SMALL]
    proc = run_cli(*args, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initial parameters from hf:{root}; new optimizer state" in proc.stdout
    assert json.loads((out / "hf.json").read_text())["architecture"] == "Qwen2ForCausalLM"
    assert (out / "tokenizer.json").exists()
    proc = run_cli(*args, "train.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stdout and "initial parameters" not in proc.stdout

    proc = run_cli("ckpt-to-hf", str(out), str(tmp_path / "back"), module="train.convert")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForCausalLM"]
    assert saved["vocab_size"] == ref.config.vocab_size
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    loaded = load(str(out), load_config(None, ["compile_cache_dir=null"]),
                  ["model.dtype=float32"])
    ids = np.random.default_rng(1).integers(0, ref.config.vocab_size, (8, 24))
    ours = np.asarray(loaded.model(ids))[..., :ref.config.vocab_size]
    np.testing.assert_allclose(ours, torch_logits(back, ids), rtol=1e-4, atol=1e-4)
    assert not np.allclose(torch_logits(back, ids), torch_logits(ref, ids), atol=1e-3)


def test_init_from_a_run_or_an_export_takes_its_parameters(trained_run, tmp_path, devices):
    """A run directory (its latest checkpoint) and an export of it give the same first
    parameters, equal to the run's own, on another mesh."""
    from flax import nnx

    from train.inference import load
    from train.inference.export import export
    user = load_config(None, ["mesh.data=1", "mesh.fsdp=8", "compile_cache_dir=null"])
    want = jax.tree.leaves(nnx.state(load(str(trained_run), user).model, nnx.Param))
    export(str(trained_run), str(tmp_path / "export"), user)
    for source in (trained_run, tmp_path / "export"):
        cfg = load_config(FINETUNE, [f"model.init_from={source}", "train.seq_len=32",
                                     "train.batch_size=8", "mesh.data=1", "mesh.fsdp=8",
                                     "compile_cache_dir=null"])
        p = plan(cfg)
        params = initial_params(cfg, p)()
        got = jax.tree.leaves(params)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
