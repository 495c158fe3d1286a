"""Hugging Face checkpoints in and out.

    python -m train.convert hf-to-ckpt HF_DIR OUT_DIR [--config X.yaml key=value ...]
    python -m train.convert ckpt-to-hf CKPT_DIR HF_DIR [--config X.yaml key=value ...]

hf-to-ckpt reads a local HF directory (config.json + safetensors) of a LlamaForCausalLM
or GPT2LMHeadModel, lays each parameter out on the mesh of --config as it is read, and
writes an export directory (params/ + config.json, plus the tokenizer.json if the HF
directory has one) that `python -m train.generate`, `python -m train.eval` and
ckpt-to-hf read. model.* overrides that keep shapes apply (e.g. model.dtype=float32).

ckpt-to-hf takes a run directory, a step directory or an export and writes config.json,
model.safetensors (shards over 4 GiB, with an index) in float32 and the tokenizer.json
if the model has one: `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`
loads it. The vocabulary is unpadded to the original HF size (converted models) or the
tokenizer's size (our runs).
"""

from __future__ import annotations

import argparse
import shutil

from train.cli import fail, guarded, parse, start_tool


def hf_to_ckpt(hf_dir: str, out_dir: str, user, overrides) -> str:
    import json

    import jax
    from etils import epath

    import sharding
    from train import hf
    from train.checkpoint import abstract_tree
    from train.config import Config, _merge, from_dict, parse_override, to_dict
    from train.export import write_export
    from train.state import plan_state

    src = epath.Path(hf_dir)
    if not (src / "config.json").exists():
        raise hf.ConvertError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    hf_cfg = json.loads((src / "config.json").read_text())
    raw = to_dict(user)
    # shapes from HF; how to compute (dtype, remat, attention, ...) from --config
    keep = {k: v for k, v in raw["model"].items() if k in hf.COMPUTE_KEYS}
    raw["model"] = {**to_dict(Config())["model"], **keep, **hf.model_config(hf_cfg)}
    for text in overrides:  # the user's model.* keys that keep shapes (dtype, attention)
        if text.split("=", 1)[0].strip().startswith("model."):
            raw = _merge(raw, parse_override(text))
    raw["name"] = src.name
    raw["train"]["seq_len"] = min(raw["train"]["seq_len"], raw["model"]["max_seq_len"])
    has_tok = (src / "tokenizer.json").exists()
    cfg = from_dict(raw)
    mesh = sharding.make_mesh(cfg.mesh.axes(), dcn=cfg.mesh.dcn())
    rules = sharding.make_rules(cfg.sharding.rules, mesh.axis_names)
    _, abstract, shardings = plan_state(cfg, mesh, rules)
    target = abstract_tree(abstract, shardings)["params"]
    params = hf.load_params(hf_dir, cfg.model, target, cfg.model.param_dtype)
    arch = (hf_cfg.get("architectures") or ["?"])[0]
    info = {"step": 0, "hf": {"architecture": arch, "vocab_size": hf_cfg["vocab_size"],
                              "source": str(src), "eos_token_id": hf_cfg.get("eos_token_id"),
                              "bos_token_id": hf_cfg.get("bos_token_id"),
                              "tokenizer": "tokenizer.json" if has_tok else None}}
    write_export(out_dir, params, cfg, info)
    if has_tok and jax.process_index() == 0:
        shutil.copyfile(src / "tokenizer.json", epath.Path(out_dir) / "tokenizer.json")
    m = cfg.model
    return (f"converted {arch} ({m.num_layers} layers, d {m.d_model}, vocab "
            f"{hf_cfg['vocab_size']:,} padded to {m.vocab_size:,}) from {hf_dir} to {out_dir} "
            f"on mesh {sharding.describe(mesh)}")


def ckpt_to_hf(ckpt: str, hf_dir: str, user, overrides, tokenizer: str | None) -> str:
    import json

    import jax
    from etils import epath

    from train import hf
    from train.data.sources import DataError
    from train.load import find_tokenizer, load

    out = epath.Path(hf_dir)
    if (out / "config.json").exists():
        raise hf.ConvertError(f"{hf_dir} already holds a model (config.json); choose "
                              "another directory")
    loaded = load(ckpt, user, overrides)
    m, source = loaded.cfg.model, loaded.info.get("hf") or {}
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
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
    tensors = hf.export_tensors(m, _params(loaded.model), vocab)
    if jax.process_index() == 0:
        files = hf.write_safetensors(hf_dir, tensors)
        (out / "config.json").write_text(json.dumps(hf.hf_config(m, vocab, eos, bos), indent=1))
        if tok is not None and tok.kind == "hf":
            shutil.copyfile(tok.path, out / "tokenizer.json")
    else:
        for _ in tensors:  # the gathers are collective: every process takes part
            pass
        files = []
    return (f"wrote {hf_dir} ({m.style}, vocab {vocab:,}, {', '.join(files)}) from "
            f"{loaded.where}")


def _params(model):
    from flax import nnx
    return nnx.state(model, nnx.Param)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Convert Hugging Face checkpoints in and out.")
    p.add_argument("command", choices=["hf-to-ckpt", "ckpt-to-hf"])
    p.add_argument("source", help="HF directory (hf-to-ckpt) or our checkpoint/export")
    p.add_argument("dest", help="export directory (hf-to-ckpt) or HF directory (ckpt-to-hf)")
    p.add_argument("--config", default=None, help="YAML config for the mesh (default: "
                   "configs/default.yaml)")
    p.add_argument("--tokenizer", help="ckpt-to-hf: tokenizer file to copy (default: the "
                   "model's own)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    user, args = parse(p, argv)

    def go():
        is_main = start_tool(user)
        from train import hf
        try:
            if args.command == "hf-to-ckpt":
                line = hf_to_ckpt(args.source, args.dest, user, args.overrides)
            else:
                line = ckpt_to_hf(args.source, args.dest, user, args.overrides, args.tokenizer)
        except hf.ConvertError as e:
            fail(str(e))
        if is_main:
            print(line)

    guarded(go)


if __name__ == "__main__":
    main()
