"""`python -m train.export --checkpoint PATH --output DIR [--config X.yaml key=value ...]`

Writes the parameters of a checkpoint (no optimizer state) for inference: DIR/params
(an Orbax PyTree of the model's nnx.Param arrays) and DIR/config.json (the resolved
config the checkpoint was trained with). PATH is a run's output_dir, its checkpoints/
directory (latest step) or one step's directory. `load_exported(DIR, mesh)` reads it
back onto any mesh.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from etils import epath

import sharding
from train.checkpoint import CheckpointError, abstract_tree, find_checkpoint
from train.cli import guarded, parse, parser
from train.config import Config, from_dict, to_dict
from train.load import CONFIG_JSON, PARAMS, checkpoint_config, restore_export
from train.state import plan_state


def saved_config(source, step: int) -> Config:
    """The resolved config stored with checkpoint `step`."""
    return from_dict(checkpoint_config(source, step))


def write_export(output: str, params, cfg: Config, info: dict) -> None:
    """DIR/params (Orbax) and DIR/config.json ({"config": ..., **info}); every process
    calls it (the save is collective), process 0 writes the JSON."""
    out = epath.Path(output)
    if (out / PARAMS).exists():
        raise CheckpointError(f"{out / PARAMS} exists already; choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as writer:
        writer.save(out / PARAMS, params)
    if jax.process_index() == 0:
        (out / CONFIG_JSON).write_text(json.dumps({**info, "config": to_dict(cfg)}, indent=1))


def export(checkpoint: str, output: str, mesh_cfg: Config) -> int:
    """Params of `checkpoint` -> `output`; the mesh from `mesh_cfg`. Returns the step."""
    source, step = find_checkpoint(checkpoint)
    cfg = saved_config(source, step)
    mesh = sharding.make_mesh(mesh_cfg.mesh.axes(), dcn=mesh_cfg.mesh.dcn())
    rules = sharding.make_rules(mesh_cfg.sharding.rules, mesh.axis_names)
    _, abstract, shardings = plan_state(cfg, mesh, rules)
    params = source.restore_params(step, abstract_tree(abstract, shardings)["params"])
    write_export(output, params, cfg, {"step": step})
    return step


def load_exported(directory: str, mesh, rules=None):
    """(Config, params nnx.State sharded on `mesh`) from an export directory."""
    info = json.loads((epath.Path(directory) / CONFIG_JSON).read_text())
    cfg = from_dict(info["config"])
    rules = rules if rules is not None else sharding.make_rules(cfg.sharding.rules,
                                                                mesh.axis_names)
    _, abstract, shardings = plan_state(cfg, mesh, rules)
    return cfg, restore_export(directory, abstract_tree(abstract, shardings)["params"])


def main(argv=None) -> None:
    p = parser("Export a checkpoint's parameters for inference.")
    p.add_argument("--checkpoint", required=True,
                   help="run output_dir, checkpoints dir, or one step's dir")
    p.add_argument("--output", required=True, help="directory to write params/ and config.json")
    cfg, args = parse(p, argv)

    def go():
        step = export(args.checkpoint, args.output, cfg)
        print(f"exported parameters of step {step} to {args.output}")

    guarded(go)


if __name__ == "__main__":
    main()
