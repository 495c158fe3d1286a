"""`python -m train.layout --config X.yaml [--devices N] key=value ...`

Prints how every parameter is laid out on the configured mesh (logical axes, the
PartitionSpec the rules give, bytes per device) and the per-device total of
parameters + optimizer state, without allocating anything. With --devices N it fakes N
CPU devices (on any machine, GPU or TPU ones too), so a pod-sized mesh can be checked
on a laptop.
"""

from train import cli
from train.preflight.layout import show_layout


def main(argv=None) -> None:
    p = cli.parser("Show the sharded layout of a config's parameters.")
    p.add_argument("--devices", type=int, default=None,
                   help="fake this many CPU devices (default: the real devices)")
    cli.main(p, argv, lambda cfg, a: show_layout(cfg),
             start=lambda a: {"cpu_devices": a.devices, "processes": not a.devices})


if __name__ == "__main__":
    main()
