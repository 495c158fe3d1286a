"""`python -m train.generate --checkpoint PATH --prompt "..." [--config X.yaml key=value ...]`

Sharded generation with a KV cache. PATH is a run's output_dir (its latest checkpoint),
a checkpoints dir, one step's dir, or an export (`python -m train.export`,
`python -m train.convert hf-to-ckpt`); the model config is the one saved beside it, the
mesh and rules come from --config and overrides (default: configs/default.yaml's).
"""

from train import cli, startup
from train.inference.generate import generate_text, read_prompts


def main(argv=None) -> None:
    p = cli.parser("Generate text with a trained (or converted) model.")
    p.add_argument("--checkpoint", required=True,
                   help="run output_dir, checkpoints dir, one step's dir, or an export")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line (a literal \\n "
                   "in a line stands for a newline)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer file (default: the one the model came with)")
    cli.main(p, argv, lambda cfg, a: startup.echo(generate_text(
        cfg, a.overrides, a.checkpoint, read_prompts(a.prompt, a.prompts_file),
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
        top_p=a.top_p, seed=a.seed, tokenizer=a.tokenizer)), start={})


if __name__ == "__main__":
    main()
