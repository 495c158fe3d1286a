"""`python -m train.tokenizer --input PATH_OR_GLOB --output tokenizer.json --vocab-size N`:
train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on your own text, with
<|endoftext|> as the end-of-document token. Then: `data.tokenizer=tokenizer.json`.

Reads the same inputs as train.prepare (text files, directories, globs, .jsonl, .parquet,
`datasets` directories; data.text_field from the config).
"""

from train import cli
from train.data.tokenizer import train_tokenizer


def main(argv=None) -> None:
    p = cli.parser("Train a byte-level BPE tokenizer on your own text.")
    p.add_argument("--input", required=True, help="file, directory or glob (quote it)")
    p.add_argument("--output", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="target vocabulary size, special token included (default 8192)")
    cli.main(p, argv, lambda cfg, a: print(train_tokenizer(a.input, a.output, a.vocab_size,
                                                           cfg.data.text_field)))


if __name__ == "__main__":
    main()
