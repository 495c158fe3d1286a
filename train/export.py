"""`python -m train.export --checkpoint PATH --output DIR [--config X.yaml key=value ...]`

Writes the parameters of a checkpoint (no optimizer state) for inference: DIR/params,
DIR/config.json (the config the checkpoint was trained with) and its tokenizer. PATH is
a run's output_dir, its checkpoints/ directory (latest step) or one step's directory.
`train.inference.load_exported(DIR, mesh)` reads it back onto any mesh.
"""

from train import cli, startup
from train.inference.export import export


def main(argv=None) -> None:
    p = cli.parser("Export a checkpoint's parameters for inference.")
    p.add_argument("--checkpoint", required=True,
                   help="run output_dir, checkpoints dir, or one step's dir")
    p.add_argument("--output", required=True, help="directory to write params/ and config.json")
    cli.main(p, argv, lambda cfg, a: startup.echo(
        f"exported parameters of step {export(a.checkpoint, a.output, cfg)} to {a.output}"),
        start={})


if __name__ == "__main__":
    main()
