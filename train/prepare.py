"""`python -m train.prepare --input PATH_OR_GLOB --output DIR [--tokenizer T]`: tokenize
a corpus once into a prepared directory (memory-mapped tokens and document offsets) that
`data.path=DIR` trains from.

Inputs: text files (one document each), directories and globs of them, .jsonl (the
data.text_field of each line), .parquet (that column), a `datasets` save_to_disk
directory. The tokenizer: byte (default), a tokenizer.json or a SentencePiece .model
(default: the config's data.tokenizer). data.val_fraction, data.text_field and
data.eos_token come from the config.
"""

from __future__ import annotations

from train.cli import guarded, parse, parser


def main(argv=None) -> None:
    p = parser("Tokenize a corpus once into a prepared data directory.")
    p.add_argument("--input", required=True, help="file, directory or glob (quote it)")
    p.add_argument("--output", required=True, help="prepared directory to write")
    p.add_argument("--tokenizer", default=None,
                   help="byte, tokenizer.json or SentencePiece .model (default: data.tokenizer)")
    cfg, args = parse(p, argv)
    d = cfg.data

    def go():
        from train.data.prepared import prepare
        prepare(args.input, args.output, args.tokenizer or d.tokenizer,
                text_field=d.text_field, val_fraction=d.val_fraction, eos_token=d.eos_token)

    guarded(go)


if __name__ == "__main__":
    main()
