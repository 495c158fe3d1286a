"""Export for inference: a checkpoint's parameters (no optimizer state) in a directory
of their own, DIR/params (an Orbax PyTree of the model's nnx.Param arrays), with
DIR/config.json (the resolved config the checkpoint was trained with) and the
tokenizer the model reads (DIR/tokenizer.json or tokenizer.model; none for bytes).
`load_exported(DIR, mesh)` reads it back onto any mesh.
"""

from __future__ import annotations

import json
import shutil

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from train.checkpoint import absolute
from train.config import Config, from_dict, to_dict
from train.errors import CheckpointError
from train.inference.load import (
    CONFIG_JSON,
    PARAMS,
    find_tokenizer,
    load,
    plain,
    read_export_info,
    restore_export,
)
from train.plan import plan


def write_export(output: str, params, cfg: Config, info: dict,
                 tokenizer_path: str | None = None) -> None:
    """DIR/params (Orbax), DIR/config.json ({"config": ..., **info}) and a copy of the
    tokenizer file; every process calls it (the save is collective), process 0 writes
    the files."""
    out = epath.Path(absolute(output))
    if (out / PARAMS).exists():
        raise CheckpointError(f"{out / PARAMS} exists already; choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as writer:
        writer.save(out / PARAMS, params)
    if jax.process_index() == 0:
        (out / CONFIG_JSON).write_text(json.dumps({**info, "config": to_dict(cfg)}, indent=1))
        if tokenizer_path:
            name = "tokenizer.json" if str(tokenizer_path).endswith(".json") else "tokenizer.model"
            shutil.copyfile(tokenizer_path, out / name)


def export(checkpoint: str, output: str, user: Config) -> int:
    """Params of `checkpoint` -> `output`, read onto the mesh of `user` (the export
    keeps the checkpoint's own config); returns the step."""
    loaded = load(checkpoint, user)
    tok = find_tokenizer(loaded)
    cfg, params = plain(from_dict(loaded.saved), nnx.state(loaded.model, nnx.Param))
    write_export(output, params, cfg, dict(loaded.info), getattr(tok, "path", None))
    return loaded.info["step"]


def load_exported(directory: str, mesh, rules=None):
    """(Config, params nnx.State sharded on `mesh`) from an export directory."""
    directory = absolute(directory)
    cfg = from_dict(read_export_info(directory)[1])
    p = plan(cfg, mesh=mesh, rules=rules, batches=False)
    return cfg, restore_export(directory, p.params_target())
