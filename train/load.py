"""A trained model for inference: its parameters, from a run's checkpoint or an export
directory (`python -m train.export`, `python -m train.convert hf-to-ckpt`), laid out
on the mesh the user chose; and the tokenizer it was trained with.

The model config is the resolved config saved beside the parameters; `--config` and
key=value overrides choose the mesh and rules (and may change model keys that do not
change shapes, e.g. model.dtype=float32 or model.attention).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
from etils import epath
from flax import nnx

import sharding
from train.checkpoint import (CheckpointError, abstract_tree, check_param_shapes,
                              find_checkpoint)
from train.config import Config, _merge, from_dict, parse_override, to_dict
from train.state import plan_state

PARAMS, CONFIG_JSON = "params", "config.json"


@dataclasses.dataclass
class Loaded:
    cfg: Config  # the saved config with the user's mesh, rules and model overrides
    model: Any  # the Transformer (nnx), parameters sharded on `mesh`
    mesh: jax.sharding.Mesh
    rules: dict
    where: str  # what was loaded, for messages
    info: dict  # {"step": N} and, for converted models, "hf": what the source was
    source_dir: str = ""  # the path given


def is_export(path: str) -> bool:
    p = epath.Path(path)
    return (p / CONFIG_JSON).exists() and (p / PARAMS).exists()


def saved_config(path: str) -> tuple[dict, dict, Any]:
    """(raw saved config, metadata ({"step": N, ...}), the checkpoint directory or None
    for an export) of `path`."""
    if is_export(path):
        info = json.loads((epath.Path(path) / CONFIG_JSON).read_text())
        return info["config"], info, None
    source, step = find_checkpoint(path)
    return checkpoint_config(source, step), {"step": step}, source


def checkpoint_config(source, step: int) -> dict:
    """The resolved config stored with checkpoint `step` of `source` (raw dict)."""
    import orbax.checkpoint as ocp
    return source.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]


def with_user_settings(saved: dict, user: Config, overrides: Sequence[str]) -> Config:
    """The saved config with the user's mesh and rules, and their explicit overrides of
    `model.*` (and `eval.*`/`data.*`/`train.batch_size`/`train.seq_len`: what a tool
    reads besides the model) applied on top."""
    raw = dict(saved)
    raw["mesh"], raw["sharding"] = to_dict(user)["mesh"], to_dict(user)["sharding"]
    raw["compile_cache_dir"] = user.compile_cache_dir
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.split(".")[0] in ("model", "data", "eval") or key in (
                "train.batch_size", "train.seq_len"):
            raw = _merge(raw, parse_override(text))
    return from_dict(raw)


def load(path: str, user: Config, overrides: Sequence[str] = ()) -> Loaded:
    """Parameters at `path` (run dir, checkpoints dir, step dir or export dir) on the
    mesh of `user`. A checkpoint whose shapes differ from the model config is a
    CheckpointError naming the first parameter that differs."""
    if not epath.Path(path).exists():
        raise CheckpointError(f"--checkpoint {path!r} does not exist")
    raw, info, source = saved_config(path)
    cfg = with_user_settings(raw, user, overrides)
    mesh = sharding.make_mesh(cfg.mesh.axes(), dcn=cfg.mesh.dcn())
    rules = sharding.make_rules(cfg.sharding.rules, mesh.axis_names)
    _, abstract, shardings = plan_state(cfg, mesh, rules)
    target = abstract_tree(abstract, shardings)["params"]
    if source is not None:
        params = source.restore_params(info["step"], target)
        where = f"{source.directory} step {info['step']}"
    else:
        params = restore_export(path, target)
        where = path
    return Loaded(cfg, nnx.merge(abstract.graphdef, params), mesh, rules, where, info, path)


def restore_export(path: str, target: nnx.State) -> nnx.State:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(epath.Path(path) / PARAMS)
        saved = getattr(saved, "item_metadata", saved)
        saved = getattr(saved, "tree", saved)
        check_param_shapes(saved, target, path)
        return reader.restore(epath.Path(path) / PARAMS, target)


def find_tokenizer(loaded: Loaded, explicit: str | None = None):
    """The tokenizer of a loaded model: `explicit` (--tokenizer), else the tokenizer
    file of an export directory, else the one the run was trained with (data.tokenizer,
    or the copy in its prepared data directory). A model converted from Hugging Face
    without a tokenizer file needs --tokenizer."""
    from train.data.tokenizer import load_tokenizer
    from train.data.sources import DataError
    cfg = loaded.cfg
    if explicit:
        return load_tokenizer(explicit, cfg.data.eos_token)
    candidates = []
    if loaded.source_dir and is_export(loaded.source_dir):
        candidates += [str(epath.Path(loaded.source_dir) / n)
                       for n in ("tokenizer.json", "tokenizer.model")]
    if "hf" not in loaded.info:  # our own runs: what they trained with
        candidates.append(cfg.data.tokenizer)
        if cfg.data.path:
            candidates += [str(epath.Path(cfg.data.path) / n)
                           for n in ("tokenizer.json", "tokenizer.model")]
    for spec in candidates:
        if spec == "byte" or epath.Path(spec).exists():
            return load_tokenizer(spec, cfg.data.eos_token)
    raise DataError(f"no tokenizer found for {loaded.where} (looked for "
                    f"{', '.join(candidates) or 'a tokenizer file'}); pass --tokenizer FILE")
