"""LoRA: adapters on the layers' projections, the base frozen; checked against the base
model, the merged weights, one device, and `peft` loading our adapter export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import lora
from train.config import load_config
from train.errors import ConfigError
from train.plan import plan
from train.state import init_state, split_trainable
from train.step import compute_grads, jit_train_step

from helpers import REPO, run_cli, small_config, torch_logits

LORA = ("model.lora.rank=4", "model.lora.alpha=8")


def batch_for(cfg, p, seed=0):
    rng = np.random.default_rng(seed)
    t = cfg.train
    tokens = rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1)).astype(np.int32)
    from train.data.batches import to_global
    return to_global({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, cfg, p.batch_sharding)


def trained(cfg, devices, steps=3):
    """(the planned state after `steps` train steps, the losses, the initial state)."""
    p = plan(cfg, devices=devices)
    state = init_state(p.init, p.shardings, 0)
    first = jax.tree.map(np.asarray, state.params)
    step = jit_train_step(p.shardings, {k: p.batch_sharding for k in ("inputs", "targets")})
    batch = batch_for(cfg, p)  # one batch throughout: the loss must fall
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses, first


def test_an_adapted_model_starts_as_its_base_bit_for_bit(devices):
    cfg, base_cfg = small_config(*LORA), small_config()
    ids = np.random.default_rng(0).integers(0, 256, (8, 16))
    p, base_p = plan(cfg), plan(base_cfg)
    lora_state = init_state(p.init, p.shardings, 0)
    base_state = init_state(base_p.init, base_p.shardings, 0)
    _, frozen = split_trainable(lora_state.params, True)
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(base_state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(lora_state.model()(ids)),
                                  np.asarray(base_state.model()(ids)))


def test_only_the_adapters_train_and_hold_optimizer_state(devices):
    """Adam's moments exist for the adapters alone; after three steps every base weight
    is bit for bit what it was, every adapter has moved, and the loss fell."""
    state, losses, first = trained(small_config(*LORA, "optimizer.lr=3e-2",
                                                "optimizer.warmup_steps=1"), devices)
    adapters, frozen = split_trainable(state.params, True)
    n_adapters = len(jax.tree.leaves(adapters))
    assert n_adapters == 2 * 7  # q, k, v, o, gate, up, down: A and B each
    mu = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(mu) == 2 * n_adapters  # Adam's first and second moments, nothing else
    first_adapters, first_frozen = split_trainable(first, True)
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(first_frozen)):
        np.testing.assert_array_equal(np.asarray(got), want)
    for got, want in zip(jax.tree.leaves(adapters), jax.tree.leaves(first_adapters)):
        assert not np.array_equal(np.asarray(got), want)
    assert losses[-1] < losses[0]


def test_merged_weights_equal_the_adapted_forward_and_sharded_equals_one_device(devices):
    """After training, folding the adapters into the weights gives the adapted model's
    logits; the same training on a 2x2x2 fsdp x tp mesh gives one device's results."""
    cfg = small_config(*LORA, "optimizer.lr=3e-2", "optimizer.warmup_steps=1",
                       "mesh.data=1", "mesh.fsdp=1")
    one, losses_one, _ = trained(cfg, devices[:1])
    sharded_cfg = small_config(*LORA, "optimizer.lr=3e-2", "optimizer.warmup_steps=1",
                               "mesh.data=2", "mesh.fsdp=2", "mesh.model=2",
                               "sharding.rules=fsdp_tp")
    many, losses_many, _ = trained(sharded_cfg, devices)
    np.testing.assert_allclose(losses_many, losses_one, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(split_trainable(many.params, True)[0]),
                         jax.tree.leaves(split_trainable(one.params, True)[0])):
        # Adam's normalized steps turn rounding in a tiny gradient into a step's worth
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    spec = many.params["blocks"]["wq_lora_b"].get_value().sharding.spec
    assert tuple(spec)[2] == "model"  # B is laid out as the heads of wq it adapts
    from dataclasses import replace

    from models import Transformer
    from models.config import LoraConfig
    merged = lora.merge_adapters(one.model().cfg, nnx.state(one.model(), nnx.Param))
    plain_cfg = replace(one.model().cfg, lora=LoraConfig())
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(plain_cfg, rngs=nnx.Rngs(0))))
    ids = np.random.default_rng(3).integers(0, 256, (8, 16))
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, merged)(ids)),
                               np.asarray(one.model()(ids)), rtol=1e-5, atol=1e-5)


@pytest.mark.once
def test_dropout_applies_in_training_only(devices):
    cfg = small_config(*LORA, "model.lora.dropout=0.5")
    p = plan(cfg, devices[:1])
    state = init_state(p.init, p.shardings, 0)
    trainable, frozen = split_trainable(state.params, True)
    # adapters' B non-zero, so the dropped inputs change the output
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    from train.state import combine
    state = state.replace(params=combine(trainable, frozen))
    batch = batch_for(cfg, p)
    with_dropout = float(jax.jit(compute_grads)(state, batch)[0]["loss"])
    no_dropout = state.replace(step_cfg=type(state.step_cfg)(
        state.step_cfg.z_loss, state.step_cfg.schedule, True, None))
    without = float(jax.jit(compute_grads)(no_dropout, batch)[0]["loss"])
    assert with_dropout != pytest.approx(without, rel=1e-4)
    ids = np.asarray(batch["inputs"]).reshape(-1, cfg.train.seq_len)
    np.testing.assert_array_equal(np.asarray(state.model()(ids)),
                                  np.asarray(no_dropout.model()(ids)))  # no dropout here


@pytest.mark.parametrize("overrides, message", [
    (("model.lora.rank=4", "model.lora.targets=[q, x]"),
     "model.lora.targets has ['x']; allowed: q, k, v, o, gate, up, down"),
    (("model.lora.rank=4", "model.style=gpt2", "model.num_kv_heads=8",
      "model.lora.targets=[q, gate]"), "model.lora.targets names 'gate', which a GPT-2 model "
     "has not (its MLP is up and down); leave it out"),
    (("model.lora.rank=4", "model.lora.dropout=1.0"), "model.lora.dropout=1.0 must be in [0, 1)"),
])
def test_bad_lora_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        small_config(*overrides)
    assert str(err.value) == message


@pytest.mark.once
def test_a_lora_run_exports_to_peft_and_merged_to_transformers(hf_llama_dir, tmp_path,
                                                               devices):
    """`python -m train` with LoRA on an HF Llama: checkpoints hold the adapters only and
    resume; `ckpt-to-peft` loads with peft onto the transformers base with our logits
    (1e-4); `ckpt-to-hf` writes the merged model, which transformers loads with them."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from train.inference import load
    root, ref = hf_llama_dir
    out = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "finetune.yaml"), f"model.init_from=hf:{root}",
            f"data.path={root}/corpus.txt", f"data.cache_dir={tmp_path}/cache",
            f"output_dir={out}", "model.dtype=float32", "train.seq_len=32",
            "train.batch_size=8", "mesh.data=2", "mesh.fsdp=2", "mesh.model=2",
            "sharding.rules=fsdp_tp", "compile_cache_dir=null", "optimizer.lr=2e-2",
            "optimizer.warmup_steps=1", "checkpoint.every_steps=2", "eval.every_steps=0",
            *LORA]
    proc = run_cli(*args, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import orbax.checkpoint as ocp
    saved = ocp.PyTreeCheckpointer().metadata(out / "checkpoints" / "2" / "state")
    saved = getattr(saved, "item_metadata", saved)
    names = set(dict(getattr(saved, "tree", saved))["params"]["blocks"])
    assert names == {f"{w}{s}" for w in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_out")
                     for s in (lora.A, lora.B)}  # the adapters; the base is the source's
    proc = run_cli(*args, "train.steps=3")
    assert proc.returncode == 0 and "resumed from step 2" in proc.stdout, proc.stderr[-3000:]

    proc = run_cli("ckpt-to-peft", str(out), str(tmp_path / "peft"), module="train.convert")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    user = load_config(None, ["compile_cache_dir=null"])
    loaded = load(str(out), user, ["model.dtype=float32"])
    V = ref.config.vocab_size
    ids = np.random.default_rng(1).integers(0, V, (8, 24))
    ours = np.asarray(loaded.model(ids))[..., :V]
    base = transformers.AutoModelForCausalLM.from_pretrained(root).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    np.testing.assert_allclose(torch_logits(adapted, ids), ours, rtol=1e-4, atol=1e-4)
    assert not np.allclose(torch_logits(ref, ids), ours, atol=1e-3)  # the adapters moved

    proc = run_cli("ckpt-to-hf", str(out), str(tmp_path / "merged"), module="train.convert")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(torch_logits(merged, ids), ours, rtol=1e-4, atol=1e-4)
    assert jnp.dtype(loaded.cfg.model.param_dtype) == jnp.float32
