"""`python -m train.compile --config X [--topology v5p-64 | v5e:2x2] [--slices N]`: compile
the real train step ahead of time and report what one step costs per chip, without
running it: memory against the chip's, FLOPs, and every collective with its bytes per
step, grouped by mesh axis.

With --topology the target is a TPU slice (or several) described by libtpu, compiled on
the CPU of this machine (install the `tpu` extra); several such pre-flights may run at
once, and on a TPU VM none takes the chips. Without it, the local devices. Exits 1 when
the step does not fit in memory.
"""

from train import cli
from train.preflight.compile import preflight


def main(argv=None) -> None:
    p = cli.parser("Compile the train step ahead of time and report its cost per chip.")
    p.add_argument("--topology", default=None,
                   help="TPU target, e.g. v5p-64, v5e-256, v5e:2x2 (default: local devices)")
    p.add_argument("--slices", type=int, default=1, help="number of TPU slices (DCN)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--hlo", default=None, help="also write the optimized HLO text here")
    cli.main(p, argv, lambda cfg, a: preflight(cfg, a.topology, a.slices, hlo_path=a.hlo,
                                               json_path=a.json),
             start=lambda a: {"compile_only": bool(a.topology)})


if __name__ == "__main__":
    main()
