"""`model.init_from`: a run's initial weights from elsewhere, the way fine-tuning starts.

The source is a Hugging Face model directory (`hf:DIR`: config.json + safetensors, any
family train/hf reads), an export directory (`python -m train.export`, `train.convert
hf-to-ckpt`) or a run (its latest checkpoint, a checkpoints directory or one step's
directory): parameters only, a new optimizer state, step 0. The run's own checkpoints
in output_dir always win, so a killed fine-tuning run resumes instead of restarting.

The model's shape comes from the source: `resolve` fills the model.* keys from it
before the config is built, and a shape key of the user's that contradicts it is a
ConfigError; keys about how to compute (dtype, remat, attention, ...) stay the user's.
The tokenizer comes from the source too (its tokenizer.json or tokenizer.model) unless
data.tokenizer names one. `initial_params` reads the weights onto the plan's shardings
as they are read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable

from etils import epath

from models.config import ModelConfig
from train import hf as families
from train.checkpoint import absolute, find_checkpoint
from train.config import _build
from train.errors import ConfigError, ShardlmError
from train.hf.tensors import load_params
from train.inference.load import (
    HF,
    checkpoint_config,
    is_export,
    read_export_info,
    restore_export,
)
from train.state import init_state, split_trainable

log = logging.getLogger("train")

# model.* keys a fine-tuning run may set whatever the source: how to compute and train,
# not what the parameters are
OWN_KEYS = ("init_from", "dtype", "param_dtype", "scan_layers", "remat", "attention",
            "attention_block", "context_attention", "vocab_chunks", "init_std",
            "moe.kernel", "moe.row_chunks", "moe.aux_loss_coef", "moe.router_z_loss_coef",
            "lora.rank", "lora.alpha", "lora.dropout", "lora.targets", "lora.base_dtype")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _unflat(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _local(source: str) -> str:
    return absolute(source[len(HF):] if source.startswith(HF) else source)


def hf_config(directory: str, key: str = "model.init_from") -> dict:
    """An HF directory's config.json, or a ConfigError naming `key`."""
    path = epath.Path(directory) / "config.json"
    if not path.exists():
        raise ConfigError(f"{key}=hf:{directory}: {path} does not exist (an HF model "
                          "directory holds config.json and *.safetensors)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{key}=hf:{directory}: {path} is not valid JSON") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{key}=hf:{directory}: {path} holds no mapping of keys")
    return hf


def source_model(source: str, vocab_multiple: int) -> tuple[dict, str | None]:
    """(the source's model.* keys, its tokenizer file or None)."""
    directory = _local(source)
    if source.startswith(HF):
        hf = hf_config(directory)
        try:
            model = families.model_config(hf, vocab_multiple)
        except ShardlmError as e:
            raise ConfigError(f"model.init_from={source}: {e}") from None
        artifact = directory
    elif not epath.Path(directory).exists():
        raise ConfigError(f"model.init_from={source!r} does not exist (give hf:DIR for a "
                          "Hugging Face directory, an export directory or a run)")
    elif is_export(directory):
        model, artifact = read_export_info(directory)[1]["model"], directory
    else:
        ckpts, step = find_checkpoint(directory, "model.init_from")
        model = checkpoint_config(ckpts, step)["model"]
        if (model.get("lora") or {}).get("rank"):
            raise ConfigError(f"model.init_from={source} is a LoRA run, whose checkpoints "
                              "hold its adapters only: merge them first (python -m "
                              "train.export --checkpoint RUN --output DIR) and start from DIR")
        root = epath.Path(ckpts.directory)
        artifact = str(root.parent if root.name == "checkpoints" else root)
    tokenizer = next((str(epath.Path(artifact) / name) for name in TOKENIZER_FILES
                      if (epath.Path(artifact) / name).exists()), None)
    return model, tokenizer


def resolve(raw: dict) -> dict:
    """A raw config (files and overrides merged, before it is built) with the model.*
    keys of model.init_from's source, and its tokenizer as data.tokenizer (unless one is
    named). A shape key the user set that differs from the source's is a ConfigError."""
    model, data = raw.get("model"), raw.get("data") or {}
    source = model.get("init_from") if isinstance(model, dict) else None
    if not source or not isinstance(data, dict):  # no source, or the build says what is wrong
        return raw
    theirs, tokenizer = source_model(str(source), data.get("vocab_multiple", 128))
    try:
        full = _flat(dataclasses.asdict(_build(ModelConfig, theirs, "model.")))  # defaults in
    except ConfigError as e:
        raise ConfigError(f"model.init_from={source}: its model config is not one this "
                          f"version reads ({e})") from None
    mine = _flat(raw["model"])
    for key, value in mine.items():
        if key in OWN_KEYS or value is None or key not in full or full[key] == value:
            continue
        raise ConfigError(f"model.{key}={value!r} contradicts model.init_from={source}, "
                          f"whose {key} is {full[key]!r}; leave model.{key} out (the source "
                          "sets the model's shape)")
    own = {k: v for k, v in mine.items() if k in OWN_KEYS}
    # saved with the run's config, the source must name the same place from anywhere
    own["init_from"] = (HF if str(source).startswith(HF) else "") + _local(str(source))
    out = dict(raw, model=_unflat({**{k: v for k, v in full.items() if k not in OWN_KEYS},
                                   **own}))
    if tokenizer and data.get("tokenizer", "byte") == "byte":
        out["data"] = dict(data, tokenizer=tokenizer)
    if str(source).startswith(HF) and not data.get("path") and data.get(
            "source", "stdlib") == "stdlib":
        raise ConfigError(f"model.init_from={source} with the embedded byte corpus: a "
                          "Hugging Face model does not read bytes; set data.path to your "
                          "text (it is tokenized with the model's tokenizer)")
    return out


def hf_info(source: str) -> dict | None:
    """What train.convert needs to export a model that started from hf:DIR (the
    "hf" entry of an export's config.json), or None for other sources."""
    if not source or not source.startswith(HF):
        return None
    directory = _local(source)
    hf = hf_config(directory)
    has_tok = (epath.Path(directory) / "tokenizer.json").exists()
    return {"architecture": families.family_of(hf).ARCHITECTURE,
            "vocab_size": hf["vocab_size"], "source": source,
            "eos_token_id": hf.get("eos_token_id"), "bos_token_id": hf.get("bos_token_id"),
            "tokenizer": "tokenizer.json" if has_tok else None}


def initial_params(cfg, plan) -> Callable[[], Any] | None:
    """None without model.init_from; else a function that reads the source's parameters
    onto the plan's shardings (called only when the run has no checkpoint of its own)."""
    source = cfg.model.init_from
    if not source:
        return None

    def read():
        target = plan.base_target()  # with LoRA, the adapters stay fresh
        directory = _local(source)
        if source.startswith(HF):
            family = families.family_of(hf_config(directory))
            params = load_params(directory, cfg.model, family.mapping(cfg.model), target)
        elif is_export(directory):
            params = restore_export(directory, target)
        else:
            ckpts, step = find_checkpoint(directory, "model.init_from")
            params = ckpts.restore_params(step, target)
        log.info("initial parameters from %s; new optimizer state, starting at step 0", source)
        return params

    return read


def base_params(cfg, plan) -> Any:
    """The frozen base of a LoRA model (its checkpoints hold the adapters only):
    model.init_from's parameters, or those of the seeded init a run without a source
    started from."""
    read = initial_params(cfg, plan)
    if read is not None:
        return read()
    return split_trainable(init_state(plan.init, plan.shardings, cfg.train.seed).params,
                           True)[1]
