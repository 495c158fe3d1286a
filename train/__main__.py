"""`python -m train --config configs/X.yaml key=value ...`: train a model."""

from train import cli
from train.loop import run


def main(argv=None) -> None:
    cli.main(cli.parser("Train a sharded decoder-only Transformer."), argv,
             lambda cfg, args: run(cfg), start={},
             terminated="stopped by SIGTERM before training began: nothing new was saved; "
                        "rerun the same command to start")


if __name__ == "__main__":
    main()
