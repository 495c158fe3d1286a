"""`python -m train.prepare --input PATH_OR_GLOB --output DIR [--tokenizer T]`: tokenize
a corpus once into a prepared directory (memory-mapped tokens and document offsets) that
`data.path=DIR` trains from.

Inputs: text files (one document each), directories and globs of them, .jsonl (the
data.text_field of each line), .parquet (that column), a `datasets` save_to_disk
directory; chat rows (messages, or prompt and completion) rendered with the chat
template beside the tokenizer.json (train/data/chat.py). The tokenizer: byte (default), a
tokenizer.json or a SentencePiece .model (default: the config's data.tokenizer).
data.val_fraction, data.text_field, data.eos_token, data.format and (for the count of
over-long chat examples) train.seq_len come from the config.
"""

from train import cli
from train.data.prepared import prepare


def main(argv=None) -> None:
    p = cli.parser("Tokenize a corpus once into a prepared data directory.")
    p.add_argument("--input", required=True, help="file, directory or glob (quote it)")
    p.add_argument("--output", required=True, help="prepared directory to write")
    p.add_argument("--tokenizer", default=None,
                   help="byte, tokenizer.json or SentencePiece .model (default: data.tokenizer)")
    cli.main(p, argv, lambda cfg, a: prepare(
        a.input, a.output, a.tokenizer or cfg.data.tokenizer, text_field=cfg.data.text_field,
        val_fraction=cfg.data.val_fraction, eos_token=cfg.data.eos_token,
        data_format=cfg.data.format, seq_len=cfg.train.seq_len))


if __name__ == "__main__":
    main()
