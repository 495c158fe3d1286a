"""`python -m train.eval --checkpoint PATH [--batches N] [--config X.yaml key=value ...]`

Loss and perplexity of a trained (or converted) model on the validation split of a
dataset, sharded over the mesh of --config. The model and, unless overridden, the data
(data.*, train.batch_size, train.seq_len) are the ones saved with the checkpoint:
the first N global batches of the validation split are the batches the training run's
own evaluation used, so a run's final eval_loss is reproduced. Point it at other data
with data.path=... (its validation split: data.val_fraction of its documents).
"""

from __future__ import annotations

import json

from train.cli import fail, guarded, parse, parser, start_tool


def evaluate(loaded, num_batches: int) -> dict:
    """{"loss", "perplexity", "tokens", "batches"} over the first `num_batches` global
    batches of the validation split."""
    import math

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train.data import make_batches, resolve_data
    from train.state import batch_sharding, check_batch_fits
    from train.step import eval_sums

    cfg, path = resolve_data(loaded.cfg)  # a tokenizer larger than the model: DataError
    check_batch_fits(cfg, loaded.mesh)
    layout = batch_sharding(cfg, loaded.mesh, loaded.rules)
    batches = make_batches(cfg, layout, path)
    graphdef, params = nnx.split(loaded.model)
    fn = jax.jit(lambda p, b: eval_sums(nnx.merge(graphdef, p), b))
    loss_sum = weight = jnp.zeros((), jnp.float32)
    for i in range(num_batches):
        out = fn(params, batches.eval_batch(i))
        loss_sum, weight = loss_sum + out["loss_sum"], weight + out["weight"]
    loss = float(loss_sum / jnp.maximum(weight, 1.0))
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(weight),
            "batches": num_batches}


def main(argv=None) -> None:
    p = parser("Loss and perplexity of a checkpoint on a dataset's validation split.")
    p.add_argument("--checkpoint", required=True,
                   help="run output_dir, checkpoints dir, one step's dir, or an export")
    p.add_argument("--batches", type=int, default=None,
                   help="global batches of the validation split (default: eval.batches)")
    user, args = parse(p, argv)

    def go():
        is_main = start_tool(user)
        from train.load import load
        loaded = load(args.checkpoint, user, args.overrides)
        n = args.batches or loaded.cfg.eval.batches
        if n < 1:
            fail(f"--batches must be at least 1, got {n}")
        out = evaluate(loaded, n)
        if is_main:
            t = loaded.cfg.train
            print(f"eval {loaded.where}: {n} batches of {t.batch_size} x {t.seq_len} "
                  f"({out['tokens']:,} tokens) | loss {out['loss']:.4f} | perplexity "
                  f"{out['perplexity']:.3f}")
            print(json.dumps(out))

    guarded(go)


if __name__ == "__main__":
    main()
