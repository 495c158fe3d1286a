"""MaxText's own ahead-of-time compile of its train step, timed and measured the way
`python -m train.compile` measures ours, for the side-by-side in docs/preflight.md.

Run in a separate environment with MaxText installed (`pip install "maxtext[tpu]==0.2.5"`)
and this repository on PYTHONPATH (for the collective counter); arguments are MaxText's
config overrides:

    PYTHONPATH=. python scripts/maxtext_preflight.py compile_topology=v5p-64 \
        compile_topology_num_slices=1 model_name=llama2-7b per_device_batch_size=4 \
        max_target_length=2048 remat_policy=full attention=dot_product dataset_type=synthetic

Prints one JSON line: compile seconds (lowering + compilation, as ours), memory per chip
(arguments + outputs - aliased + temporaries) and collective bytes per chip per step
(counted by train/preflight/hlo_collectives.py on MaxText's compiled HLO).
"""

import json
import os
import sys
import time

from train.preflight.hlo_collectives import collectives

GIB = 1024 ** 3


def main() -> None:
    import jax
    from absl import app
    from maxtext.trainers.pre_train import train_compile

    compile_fn = train_compile.jit_and_compile
    xla_seconds = []
    xla_compile = jax.stages.Lowered.compile

    def timed_compile(self, *args, **kwargs):  # XLA's part, without tracing and lowering
        t0 = time.perf_counter()
        out = xla_compile(self, *args, **kwargs)
        xla_seconds.append(time.perf_counter() - t0)
        return out

    jax.stages.Lowered.compile = timed_compile

    def measured(func, args, kwargs, mesh, *rest, **kw):
        t0 = time.perf_counter()
        compiled = compile_fn(func, args, kwargs, mesh, *rest, **kw)
        seconds = time.perf_counter() - t0
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)
        hlo = compiled.as_text()
        if os.environ.get("MAXTEXT_HLO"):  # keep the compiled HLO for a closer look
            with open(os.environ["MAXTEXT_HLO"], "w") as f:
                f.write(hlo)
        items, unknown = collectives(hlo, dict(mesh.shape))
        by_op: dict[str, float] = {}
        for c in items:
            by_op[c.op] = by_op.get(c.op, 0.0) + c.bytes_per_step / GIB
        print("MAXTEXT " + json.dumps({
            "compile_s": round(seconds, 1),
            "lower_s": round(seconds - sum(xla_seconds), 1),
            "args_gib": round(m.argument_size_in_bytes / GIB, 2),
            "temps_gib": round(m.temp_size_in_bytes / GIB, 2),
            "total_gib": round(total / GIB, 2),
            "collectives_gib": round(sum(by_op.values()), 4),
            "by_op_gib": {k: round(v, 4) for k, v in sorted(by_op.items())},
            "unknown_trip_counts": unknown}), flush=True)
        return compiled

    train_compile.jit_and_compile = measured
    base = os.path.join(os.path.dirname(train_compile.__file__), "..", "..", "configs",
                        "base.yml")
    sys.argv = ["train_compile", os.path.normpath(base)] + sys.argv[1:]
    app.run(train_compile.main)


if __name__ == "__main__":
    main()
