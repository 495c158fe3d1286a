"""`python -m train.eval --checkpoint PATH [--batches N] [--config X.yaml key=value ...]`

Loss and perplexity of a trained (or converted) model on the validation split of a
dataset, sharded over the mesh of --config. The model and, unless overridden, the data
(data.*, train.batch_size, train.seq_len) are the ones saved with the checkpoint:
the first N global batches of the validation split are the batches the training run's
own evaluation used, so a run's final eval_loss is reproduced. Point it at other data
with data.path=... (its validation split: data.val_fraction of its documents).
"""

from train import cli, startup
from train.inference.evaluate import evaluate_checkpoint


def main(argv=None) -> None:
    p = cli.parser("Loss and perplexity of a checkpoint on a dataset's validation split.")
    p.add_argument("--checkpoint", required=True,
                   help="run output_dir, checkpoints dir, one step's dir, or an export")
    p.add_argument("--batches", type=int, default=None,
                   help="global batches of the validation split (default: eval.batches)")
    cli.main(p, argv, lambda cfg, a: startup.echo(evaluate_checkpoint(
        cfg, a.overrides, a.checkpoint, a.batches)), start={})


if __name__ == "__main__":
    main()
