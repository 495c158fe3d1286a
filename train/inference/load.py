"""A trained model for inference: its parameters, from a run's checkpoint, an export
directory (`python -m train.export`, `python -m train.convert hf-to-ckpt`) or a Hugging
Face directory (`hf:DIR`, read as model.init_from reads it), laid out on the mesh the
user chose; and the tokenizer it was trained with.

The model config is the resolved config saved beside the parameters; `--config` and
key=value overrides choose the mesh and rules (and may change model keys that do not
change shapes, e.g. model.dtype=float32 or model.attention).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import Any, Sequence

import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from models import lora
from models.config import LoraConfig
from train.checkpoint import Checkpoints, absolute, check_param_shapes, find_checkpoint
from train.config import (
    Config,
    from_dict,
    merge,
    override_key,
    parse_override,
    to_dict,
    with_overrides,
)
from train.data.resolve import run_tokenizer
from train.data.tokenizer import load_tokenizer
from train.errors import CheckpointError, ConfigError, DataError
from train.plan import Plan, plan
from train.state import combine
from train.storage import first_line

PARAMS, CONFIG_JSON = "params", "config.json"
HF = "hf:"  # a Hugging Face directory, as model.init_from names one
HF_INFO = "hf.json"  # beside a run started from hf:DIR (train/init_from.py)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# What a user's override may change in a saved config: how to compute (model.*), and
# what an evaluation reads besides the model.
USER_KEYS = ("model.", "data.", "eval.", "train.batch_size", "train.seq_len")


@dataclasses.dataclass
class Loaded:
    cfg: Config  # the saved config with the user's mesh, rules and model overrides
    model: Any  # the Transformer (nnx), parameters sharded on plan.mesh
    plan: Plan
    where: str  # what was loaded, for messages
    info: dict  # {"step": N} and, for converted models, "hf": what the source was
    artifact_dir: str  # the export directory or the run directory: where its tokenizer is
    saved: dict  # the config saved beside the parameters, as it was saved

    @property
    def mesh(self):
        return self.plan.mesh

    @property
    def rules(self):
        return self.plan.rules


def plain(cfg: Config, params: nnx.State) -> tuple[Config, nnx.State]:
    """A model's config and parameters with its LoRA adapters (if any) folded into the
    weights they adapt: what exports write."""
    m = cfg.model
    if not m.lora.enabled:
        return cfg, params
    model = dataclasses.replace(m, lora=LoraConfig(), param_dtype=m.base_param_dtype)
    return dataclasses.replace(cfg, model=model), lora.merge_adapters(m, params)


def is_export(path: str) -> bool:
    p = epath.Path(path)
    return (p / CONFIG_JSON).exists() and (p / PARAMS).exists()


def checkpoint_config(source: Checkpoints, step: int) -> dict:
    """The resolved config stored with checkpoint `step` of `source` (raw dict)."""
    where = f"the config saved with checkpoint step {step} in {source.directory}"
    try:
        saved = source.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # noqa: BLE001 - a damaged file: name it and what to do
        raise CheckpointError(f"{where} cannot be read ({first_line(e)}); "
                              f"{source.fallback(step)}") from None
    return _config_dict(saved, where, source.fallback(step))


def _config_dict(saved: Any, where: str, fallback: str) -> dict:
    """`saved` if it is a config this version can build, else a CheckpointError."""
    try:
        from_dict(saved)
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where} is not a valid config ({e}); {fallback}") from None
    return saved


def with_user_settings(saved: dict, user: Config, overrides: Sequence[str]) -> Config:
    """The saved config with the user's mesh, rules and compile cache, and their
    explicit overrides of USER_KEYS applied on top."""
    raw = dict(saved)
    mine = to_dict(user)
    raw["mesh"], raw["sharding"] = mine["mesh"], mine["sharding"]
    raw["compile_cache_dir"] = user.compile_cache_dir
    return with_overrides(raw, overrides, keep=lambda key: key.startswith(USER_KEYS))


def load(path: str, user: Config, overrides: Sequence[str] = (),
         flag: str = "--checkpoint") -> Loaded:
    """Parameters at `path` (run dir, checkpoints dir, step dir or export dir) on the
    mesh of `user`. A checkpoint whose shapes differ from the model config is a
    CheckpointError naming the first parameter that differs."""
    if path.startswith(HF):
        return load_hf(path, user, overrides, flag)
    path = absolute(path)
    if not epath.Path(path).exists():
        raise CheckpointError(f"{flag} {path!r} does not exist")
    if is_export(path):
        info, saved = read_export_info(path)
        cfg = with_user_settings(saved, user, overrides)
        p = plan(cfg, batches=False)
        params = restore_export(path, p.params_target())
        where, artifact_dir = path, path
    else:
        source, step = find_checkpoint(path, flag)
        saved = checkpoint_config(source, step)
        cfg = with_user_settings(saved, user, overrides)
        p = plan(cfg, batches=False)
        params = source.restore_params(step, p.params_target())
        if cfg.model.lora.enabled:  # a LoRA checkpoint holds the adapters: add the base
            from train.init_from import base_params
            params = combine(params, base_params(cfg, p))
        info, where = {"step": step}, f"{source.directory} step {step}"
        root = epath.Path(source.directory)
        artifact_dir = str(root.parent) if root.name == "checkpoints" else str(root)
        hf_json = epath.Path(artifact_dir) / HF_INFO  # a run started from hf:DIR
        if hf_json.exists():
            info["hf"] = json.loads(hf_json.read_text())
    return Loaded(cfg, nnx.merge(p.abstract.graphdef, params), p, where, info, artifact_dir,
                  saved)


def load_hf(source: str, user: Config, overrides: Sequence[str], flag: str) -> Loaded:
    """A Hugging Face directory (`hf:DIR`) on the mesh of `user`: the model config from
    its config.json (the user's explicit model.* overrides on top, as for
    model.init_from), the parameters read onto their shardings."""
    from train.init_from import hf_info, initial_params, resolve  # imports this module
    directory = absolute(source[len(HF):])
    if not (epath.Path(directory) / "config.json").exists():
        raise CheckpointError(f"{flag} {source}: {directory}/config.json does not exist (a "
                              "Hugging Face model directory holds config.json and "
                              "*.safetensors)")
    raw = to_dict(user)
    raw["model"] = {"init_from": HF + directory}
    raw["data"] = dict(raw["data"], path=None, source="synthetic", tokenizer="byte")
    for text in overrides:
        if override_key(text).startswith("model."):
            raw = merge(raw, parse_override(text))
    cfg = from_dict(resolve(raw))
    p = plan(cfg, batches=False)
    params = initial_params(cfg, p)()
    return Loaded(cfg, nnx.merge(p.abstract.graphdef, params), p, source,
                  {"step": 0, "hf": hf_info(cfg.model.init_from)}, directory, to_dict(cfg))


def quantize_weights(loaded: Loaded, mode: str | None) -> str:
    """serve.quantize: the loaded model's layer weights quantized in place
    (models/quantize.py); returns the line that says so ("" without a mode)."""
    if mode is None:
        return ""
    from models.quantize import quantize
    before, after = quantize(loaded.model, mode)
    return (f"serve.quantize={mode}: layer weights in {mode}, parameters "
            f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")


def read_export_info(path: str) -> tuple[dict, dict]:
    """(config.json's contents, the config in it) of an export directory."""
    where = f"{epath.Path(path) / CONFIG_JSON}"
    try:
        info = json.loads((epath.Path(path) / CONFIG_JSON).read_text())
        saved = info["config"]
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{where} cannot be read ({first_line(e)}); export the "
                              "checkpoint again") from None
    return info, _config_dict(saved, where, "export the checkpoint again")


def restore_export(path: str, target: nnx.State) -> nnx.State:
    with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(epath.Path(path) / PARAMS)
        saved = getattr(saved, "item_metadata", saved)
        saved = getattr(saved, "tree", saved)
        check_param_shapes(saved, target, path)
        return reader.restore(epath.Path(path) / PARAMS, target)


def local_file(path: epath.Path) -> str:
    """A local path for `path`: itself, or a copy of a gs:// object in a temporary
    directory (the tokenizer libraries read local files only)."""
    if "://" not in str(path):
        return str(path)
    local = pathlib.Path(tempfile.mkdtemp(prefix="shardlm-")) / path.name
    local.write_bytes(path.read_bytes())
    return str(local)


def find_tokenizer(loaded: Loaded, explicit: str | None = None):
    """The tokenizer of a loaded model: `explicit` (--tokenizer), else the tokenizer
    file of its export or run directory, else the one its data was prepared with (the
    prepared directory's own, or data.tokenizer for raw inputs). A model converted from
    Hugging Face without a tokenizer file needs --tokenizer."""
    cfg = loaded.cfg
    if explicit:
        return load_tokenizer(explicit, cfg.data.eos_token)
    for name in TOKENIZER_FILES:
        candidate = epath.Path(loaded.artifact_dir) / name
        if candidate.exists():
            return load_tokenizer(local_file(candidate), cfg.data.eos_token)
    if "hf" in loaded.info:
        raise DataError(f"no tokenizer found for {loaded.where} (its Hugging Face directory "
                        "had no tokenizer.json); pass --tokenizer FILE")
    return run_tokenizer(cfg)
