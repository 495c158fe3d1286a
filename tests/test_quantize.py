"""int8 weight-only quantization (serve.quantize, models/quantize.py): the per-channel
rounding by hand; a quantized model computing what a float model holding the
dequantized weights computes (one device and a 2x2x2 mesh, dense and MoE layers), in a
quarter of the weights' bytes; `python -m train.eval serve.quantize=int8` reporting the
eval loss with int8 weights and without."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_generate import built
from test_moe import MOE

from models.quantize import INPUT_AXES, SCALE, int8_per_channel, quantize
from train.config import ConfigError, load_config

from helpers import REPO, run_cli


def test_each_output_channel_is_rounded_to_steps_of_its_largest_weight_over_127():
    w_IO = jnp.array([[1.0, -0.5, 0.0], [-2.54, 0.2, 0.0]])  # 2 inputs, 3 outputs
    q, s = int8_per_channel(w_IO, (0,))
    assert q.dtype == jnp.int8 and s.shape == (1, 3)
    np.testing.assert_allclose(s, [[2.54 / 127, 0.5 / 127, 1.0]], rtol=1e-6)
    # 1 / 0.02 = 50; 0.2 / (0.5 / 127) = 50.8 rounds to 51; an all-zero channel stays 0
    np.testing.assert_array_equal(q, [[50, -127, 0], [-127, 51, 0]])


def dequantized_copy(model, style: str, *extra: str):
    """A model on one device that is not quantized, every parameter a NumPy copy of
    `model`'s, each quantized weight replaced by q * s computed in NumPy."""
    plain, _, _ = built(style, (1, 1, 1), "fsdp_tp", *extra)
    theirs = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
        value = np.asarray(theirs[path].get_value())
        if path[-1] in INPUT_AXES:
            scale = theirs[path[:-1] + (path[-1] + SCALE,)].get_value()
            assert value.dtype == np.int8
            value = value.astype(np.float32) * np.asarray(scale)
        var.set_value(jnp.asarray(value))
    nnx.update(plain, nnx.state(plain))
    return plain


@pytest.mark.parametrize("style,mesh,extra", [
    ("llama", (2, 2, 2), ()), ("gpt2", (1, 1, 1), ()),
    pytest.param("llama", (2, 2, 2), tuple(MOE), id="moe", marks=pytest.mark.once)])
def test_a_quantized_model_computes_what_its_dequantized_weights_compute(style, mesh, extra):
    model, _, _ = built(style, mesh, "fsdp_tp", *extra)
    tokens_BT = jax.random.randint(jax.random.key(1), (4, 12), 0, 128)
    float_BTV = np.asarray(model(tokens_BT))
    weights = [v for stack in model.stacks() for name, v in stack.stacked().items()
               if name in INPUT_AXES]
    before, after = quantize(model, "int8")
    # int8 values in place of fp32, plus the fp32 scales (one per output channel)
    scales = sum(math.prod(s.shape) * 4 for stack in model.stacks()
                 for name, s in stack.stacked().items() if name.endswith(SCALE))
    assert scales and after == before - sum(w.size * 3 for w in weights) + scales
    int8_BTV = np.asarray(model(tokens_BT))
    reference = np.asarray(dequantized_copy(model, style, *extra)(tokens_BT))
    np.testing.assert_allclose(int8_BTV, reference, rtol=1e-5, atol=1e-5)
    # and close to the model before quantization, but not the same
    error = np.abs(int8_BTV - float_BTV).max()
    assert 0 < error < 0.1 * np.abs(float_BTV).max(), error


def test_eval_reports_the_loss_with_int8_weights_and_without(trained_run):
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    proc = run_cli("--checkpoint", str(trained_run), "mesh.data=2", "mesh.fsdp=2",
                   "mesh.model=2", "sharding.rules=fsdp_tp", "serve.quantize=int8",
                   module="train.eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "serve.quantize=int8: layer weights in int8, parameters " in proc.stdout
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["loss_unquantized"], last["eval_loss"], rtol=1e-5)
    assert out["quantize"] == "int8" and out["loss"] == pytest.approx(
        out["loss_unquantized"] + out["loss_difference"])
    assert 0 < abs(out["loss_difference"]) < 0.05, out
    assert f"{out['loss_difference']:+.4g}" in proc.stdout


def test_an_unknown_quantization_is_a_config_error():
    with pytest.raises(ConfigError, match="serve.quantize='int4' is not supported; use int8"):
        load_config(str(REPO / "configs" / "tiny.yaml"), ["serve.quantize=int4"])
