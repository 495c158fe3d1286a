"""`python -m train.tokenizer --input PATH_OR_GLOB --output tokenizer.json --vocab-size N`:
train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on your own text, with
<|endoftext|> as the end-of-document token. Then: `data.tokenizer=tokenizer.json`.

Reads the same inputs as train.prepare (text files, directories, globs, .jsonl, .parquet,
`datasets` directories; data.text_field from the config).
"""

from __future__ import annotations

from train.cli import guarded, parse, parser


def main(argv=None) -> None:
    p = parser("Train a byte-level BPE tokenizer on your own text.")
    p.add_argument("--input", required=True, help="file, directory or glob (quote it)")
    p.add_argument("--output", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="target vocabulary size, special token included (default 8192)")
    cfg, args = parse(p, argv)

    def go():
        from train.config import ConfigError
        from train.data.sources import documents
        from train.data.tokenizer import train_bpe
        if args.vocab_size < 257:
            raise ConfigError(f"--vocab-size={args.vocab_size}: a byte-level BPE needs at "
                              "least 257 (256 bytes and the end-of-document token)")
        texts = (text for _, text in documents(args.input, cfg.data.text_field))
        size = train_bpe(texts, args.vocab_size, args.output)
        print(f"trained a byte-level BPE tokenizer with {size:,} tokens on {args.input}; "
              f"wrote {args.output}; use it with data.tokenizer={args.output}")

    guarded(go)


if __name__ == "__main__":
    main()
