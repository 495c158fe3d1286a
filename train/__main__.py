"""`python -m train --config configs/X.yaml key=value ...`: train a model."""

from train.cli import guarded, parse, parser


def main(argv=None) -> None:
    cfg, _ = parse(parser("Train a sharded decoder-only Transformer."), argv)
    from train import xla_flags
    xla_flags.apply()  # before JAX starts its backend
    from train.loop import run  # import JAX only once the config is known to be valid
    guarded(lambda: run(cfg))


if __name__ == "__main__":
    main()
