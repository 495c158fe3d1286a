"""A Hugging Face model directory <-> our export directory (what `python -m
train.convert` runs).

hf_to_ckpt reads a local HF directory (config.json + safetensors) of a supported
family, lays each parameter out on the mesh of the user's config as it is read, and
writes an export directory (params/ + config.json, plus the tokenizer.json if the HF
directory has one). model.* overrides that keep shapes apply (e.g. model.dtype=float32).

ckpt_to_hf takes a run directory, a step directory or an export and writes config.json,
model.safetensors (shards over 4 GiB, with an index) in float32 and the tokenizer.json
if the model has one: `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`
loads it. The vocabulary is unpadded to the original HF size (converted models) or the
tokenizer's size (our runs).
"""

from __future__ import annotations

import json
import shutil
from typing import Sequence

import jax
from etils import epath
from flax import nnx

import sharding
from train.checkpoint import absolute
from train.config import Config, to_dict, with_overrides
from train.errors import ConversionError, DataError
from train.hf import COMPUTE_KEYS, family_for, family_of, model_config
from train.hf.tensors import export_tensors, load_params, write_safetensors
from train.inference import find_tokenizer, load, write_export
from train.inference.load import plain
from train.plan import plan


def hf_to_ckpt(hf_dir: str, out_dir: str, user: Config, overrides: Sequence[str]) -> str:
    """Convert; returns the line to print."""
    src = epath.Path(absolute(hf_dir))
    if not (src / "config.json").exists():
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model "
                              "directory")
    try:
        hf_cfg = json.loads((src / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConversionError(f"{src / 'config.json'} is not valid JSON{where}; download the "
                              "model's config.json again") from None
    if not isinstance(hf_cfg, dict):
        raise ConversionError(f"{src / 'config.json'} holds no mapping of keys: not a "
                              "Hugging Face config")
    family = family_of(hf_cfg)
    raw = to_dict(user)
    # shapes from HF; how to compute (dtype, remat, attention, ...) from --config
    keep = {k: v for k, v in raw["model"].items() if k in COMPUTE_KEYS}
    raw["model"] = {**to_dict(Config())["model"], **keep, **model_config(hf_cfg)}
    raw["name"] = src.name
    raw["train"]["seq_len"] = min(raw["train"]["seq_len"], raw["model"]["max_seq_len"])
    cfg = with_overrides(raw, overrides, keep=lambda key: key.startswith("model."))
    p = plan(cfg, batches=False)
    params = load_params(str(src), cfg.model, family.mapping(cfg.model), p.params_target())
    tokenizer = src / "tokenizer.json"
    has_tok = tokenizer.exists()
    info = {"step": 0, "hf": {"architecture": family.ARCHITECTURE,
                              "vocab_size": hf_cfg["vocab_size"], "source": str(src),
                              "eos_token_id": hf_cfg.get("eos_token_id"),
                              "bos_token_id": hf_cfg.get("bos_token_id"),
                              "tokenizer": "tokenizer.json" if has_tok else None}}
    write_export(out_dir, params, cfg, info, str(tokenizer) if has_tok else None)
    m = cfg.model
    experts = (f", {m.moe.num_experts} experts top-{m.moe.experts_per_token}"
               if m.moe.enabled else "")
    return (f"converted {family.ARCHITECTURE} ({m.num_layers} layers{experts}, d {m.d_model}, "
            f"vocab {hf_cfg['vocab_size']:,} padded to {m.vocab_size:,}) from {hf_dir} to "
            f"{out_dir} on mesh {sharding.describe(p.mesh)}")


def ckpt_to_hf(ckpt: str, hf_dir: str, user: Config, overrides: Sequence[str],
               tokenizer: str | None) -> str:
    """Convert; returns the line to print."""
    out = epath.Path(absolute(hf_dir))
    if (out / "config.json").exists():
        raise ConversionError(f"{hf_dir} already holds a model (config.json); choose "
                              "another directory")
    loaded = load(ckpt, user, overrides, flag="CKPT_DIR")
    cfg, params = plain(loaded.cfg, nnx.state(loaded.model, nnx.Param))  # LoRA merged
    m, source = cfg.model, loaded.info.get("hf") or {}
    family = family_for(m, source.get("architecture"))
    tok = None
    try:
        tok = find_tokenizer(loaded, tokenizer)
    except DataError:  # no tokenizer: keep the model's vocabulary
        if tokenizer:
            raise
    vocab = source.get("vocab_size") or (min(tok.vocab_size, m.vocab_size) if tok
                                         else m.vocab_size)
    eos = source.get("eos_token_id", tok.eos_id if tok else None)
    eos = eos if eos is None or isinstance(eos, list) or eos < vocab else None  # not a token
    bos = source.get("bos_token_id")
    hf_cfg = family.hf_config(m, vocab, eos, bos)  # refuses what the family cannot hold
    tensors = export_tensors(m, family, params, vocab)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        files = write_safetensors(str(out), tensors)
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=1))
        if tok is not None and tok.kind == "hf":
            shutil.copyfile(tok.path, out / "tokenizer.json")
    else:
        for _ in tensors:  # the gathers are collective: every process takes part
            pass
        files = []
    return (f"wrote {hf_dir} ({family.ARCHITECTURE}, vocab {vocab:,}, {', '.join(files)}) from "
            f"{loaded.where}")
