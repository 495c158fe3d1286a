"""`python -m train.plot RUN [--output PNG]`: a run's training and validation loss
curves from RUN/metrics.jsonl, drawn into a PNG (default RUN/loss.png)."""

import argparse

from train import cli
from train.curves import plot_run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Plot a run's loss curves into a PNG.")
    p.add_argument("run", help="the run's output_dir (holding metrics.jsonl)")
    p.add_argument("--output", default=None, help="PNG to write (default: RUN/loss.png)")
    args = p.parse_args(argv)
    cli.guarded(lambda: print(plot_run(args.run, args.output)))


if __name__ == "__main__":
    main()
