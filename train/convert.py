"""Hugging Face checkpoints in and out.

    python -m train.convert hf-to-ckpt HF_DIR OUT_DIR [--config X.yaml key=value ...]
    python -m train.convert ckpt-to-hf CKPT_DIR HF_DIR [--config X.yaml key=value ...]
    python -m train.convert ckpt-to-peft CKPT_DIR OUT_DIR [--config X.yaml key=value ...]

hf-to-ckpt writes an export directory (params/ + config.json + tokenizer.json) that
`python -m train.generate`, `python -m train.eval` and ckpt-to-hf read, laid out on the
mesh of --config; ckpt-to-hf writes config.json and safetensors that `transformers`
loads (train/hf/convert.py says what each keeps; a LoRA run's adapters are merged into
the weights); ckpt-to-peft writes a LoRA run's adapters as a PEFT adapter directory for
its Hugging Face base (train/hf/peft.py).
"""

from train import cli, startup
from train.hf.convert import ckpt_to_hf, hf_to_ckpt
from train.hf.peft import write_adapter
from train.inference import load


def main(argv=None) -> None:
    p = cli.parser("Convert Hugging Face checkpoints in and out.")
    p.add_argument("command", choices=["hf-to-ckpt", "ckpt-to-hf", "ckpt-to-peft"])
    p.add_argument("source", help="HF directory (hf-to-ckpt) or our checkpoint/export")
    p.add_argument("dest", help="export directory (hf-to-ckpt), HF directory (ckpt-to-hf) "
                   "or PEFT adapter directory (ckpt-to-peft)")
    p.add_argument("--tokenizer", help="ckpt-to-hf: tokenizer file to copy (default: the "
                   "model's own)")

    def run(cfg, a):
        if a.command == "hf-to-ckpt":
            return hf_to_ckpt(a.source, a.dest, cfg, a.overrides)
        if a.command == "ckpt-to-hf":
            return ckpt_to_hf(a.source, a.dest, cfg, a.overrides, a.tokenizer)
        return write_adapter(load(a.source, cfg, a.overrides, flag="CKPT_DIR"), a.dest)

    cli.main(p, argv, lambda cfg, a: startup.echo(run(cfg, a)), start={})


if __name__ == "__main__":
    main()
