"""Sources, tokenizers and pre-tokenization on small files the tests write, checked
against the text itself (decoding the prepared tokens gives the documents back)."""

import json

import numpy as np
import pytest

from train.data.prepared import open_split, prepare, read_meta
from train.data.sources import DataError, documents
from train.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

DOCS = [f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta", "ünïcode"][j % 5]
                                     for j in range(i, i + 30 + 7 * i)) for i in range(24)]


def prepared_texts(path, tok) -> list[str]:
    """Every document of both splits, decoded back to text, sorted."""
    texts = []
    for split in ("train", "val"):
        data = open_split(path, split)
        for a, b in zip(data.offsets_D1[:-1], data.offsets_D1[1:]):
            ids = np.asarray(data.tokens_N[a:b])
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            texts.append(tok.decode(ids[:-1].tolist()))
    return sorted(texts)


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    for i, text in enumerate(DOCS):
        (d / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(text)
    return d


def test_text_files_directory_and_glob(text_dir):
    from_dir = list(documents(str(text_dir)))
    assert sorted(t for _, t in from_dir) == sorted(DOCS)
    assert len({i for i, _ in from_dir}) == len(DOCS)  # ids are unique
    from_glob = list(documents(str(text_dir / "**" / "*.txt")))
    assert sorted(t for _, t in from_glob) == sorted(DOCS)


def test_jsonl_parquet_and_hf_datasets_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t, "n": 1}) + "\n"
                                              for t in DOCS))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS[:5]})}
                         ).save_to_disk(str(tmp_path / "hfdict"))
    for name in ("a.jsonl", "a.parquet", "hf"):
        assert [t for _, t in documents(str(tmp_path / name), "body")] == DOCS, name
    assert [t for _, t in documents(str(tmp_path / "hfdict"), "body")] == DOCS[:5]


@pytest.mark.parametrize("kind", ["byte", "bpe", pytest.param("sentencepiece",
                                                         marks=pytest.mark.once)])
def test_prepare_round_trips_every_document(tmp_path, text_dir, kind):
    if kind == "byte":
        spec = "byte"
    elif kind == "bpe":
        spec = str(tmp_path / "tok.json")
        assert train_bpe(DOCS, 300, spec) <= 300
    else:
        spm = pytest.importorskip("sentencepiece")
        (tmp_path / "corpus.txt").write_text("\n".join(DOCS))
        spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"),
                                       model_prefix=str(tmp_path / "sp"), vocab_size=36,
                                       character_coverage=1.0)
        spec = str(tmp_path / "sp.model")
    meta = prepare(str(text_dir), tmp_path / "prep", spec, val_fraction=0.2, progress=False)
    tok = load_tokenizer(spec)
    counts = meta["splits"]
    assert counts["train"]["documents"] + counts["val"]["documents"] == len(DOCS)
    assert counts["val"]["documents"] > 0
    assert meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    # The prepared directory carries its own copy of the tokenizer.
    from train.data.prepared import load_prepared_tokenizer
    again = load_prepared_tokenizer(tmp_path / "prep")
    assert again.vocab_size == tok.vocab_size
    if kind == "sentencepiece":  # SentencePiece normalizes spaces; compare words
        assert [t.split() for t in prepared_texts(tmp_path / "prep", tok)] == \
            [t.split() for t in sorted(DOCS)]
    else:
        assert prepared_texts(tmp_path / "prep", tok) == sorted(DOCS)
    if kind == "byte":
        assert counts["train"]["bytes"] + counts["val"]["bytes"] == sum(
            len(t.encode()) for t in DOCS)
        assert read_meta(tmp_path / "prep")["dtype"] == "uint16"


def test_split_is_deterministic_and_independent_of_file_order(tmp_path, text_dir):
    prepare(str(text_dir), tmp_path / "p1", val_fraction=0.3, progress=False)
    prepare(str(text_dir / "**" / "*.txt"), tmp_path / "p2", val_fraction=0.3, progress=False)
    tok = ByteTokenizer()
    for split in ("train", "val"):
        a, b = open_split(tmp_path / "p1", split), open_split(tmp_path / "p2", split)
        assert len(a.offsets_D1) == len(b.offsets_D1)  # as many documents
    assert prepared_texts(tmp_path / "p1", tok) == prepared_texts(tmp_path / "p2", tok)


def test_tokenizer_cli_then_prepare_cli(tmp_path, text_dir):
    from helpers import run_cli
    tok = tmp_path / "tok.json"
    proc = run_cli("--input", str(text_dir), "--output", str(tok), "--vocab-size", "320",
                   module="train.tokenizer")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"data.tokenizer={tok}" in proc.stdout
    proc = run_cli("--input", str(text_dir / "*.txt"), "--output", str(tmp_path / "prep"),
                   "--tokenizer", str(tok), module="train.prepare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepared " in proc.stdout and " documents, " in proc.stdout
    assert read_meta(tmp_path / "prep")["splits"]["train"]["documents"] > 0


# ------------------------------------------------------------------------- bad input


def one_error_line(*args, module="train.prepare") -> str:
    from helpers import run_cli
    proc = run_cli(*args, module=module)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.stderr.strip().splitlines() == errors, proc.stderr[-3000:]  # nothing else
    return errors[0]


def test_bad_inputs_fail_with_one_line_naming_file_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "missing.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("some text\n")
    (tmp_path / "mixed" / "index.dat").write_bytes(bytes(range(256)) * 4)
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "nocol.parquet")
    out = str(tmp_path / "out")
    for name, expected in [("empty.txt", "empty"), ("latin1.txt", "not UTF-8"),
                           ("missing.jsonl", "line 2: no field 'text' (has: body)"),
                           ("nocol.parquet", "no column 'text' (has: content)"),
                           ("mixed", "index.dat: binary, not text: leave it out")]:
        error = one_error_line("--input", str(tmp_path / name), "--output", out)
        assert str(tmp_path / name) in error and expected in error, error
    error = one_error_line("--input", str(tmp_path / "nothing-*.txt"), "--output", out)
    assert "matches no files" in error


def test_tokenizer_larger_than_fixed_vocab_is_refused(tmp_path, text_dir):
    prepare(str(text_dir), tmp_path / "prep", progress=False)  # byte: 257 tokens
    error = one_error_line("--config", "configs/tiny.yaml", "model.vocab_size=256",
                           f"data.path={tmp_path / 'prep'}", f"output_dir={tmp_path / 'run'}",
                           module="train")
    assert "257 tokens but model.vocab_size=256" in error and "model.vocab_size=null" in error


def test_vocab_from_tokenizer_is_padded(tmp_path, text_dir):
    from train.config import load_config
    from train.data.resolve import resolve_data

    from helpers import REPO
    tiny = str(REPO / "configs" / "tiny.yaml")
    prepare(str(text_dir), tmp_path / "prep", progress=False)
    cfg = load_config(tiny, [f"data.path={tmp_path / 'prep'}"])
    assert cfg.model.vocab_size is None
    cfg, path = resolve_data(cfg)
    assert cfg.model.vocab_size == 384 and path == str(tmp_path / "prep")  # 257 -> 3 x 128
    cfg, _ = resolve_data(load_config(tiny, [
        f"data.path={tmp_path / 'prep'}", "data.vocab_multiple=64"]))
    assert cfg.model.vocab_size == 320


def test_empty_files_among_many_are_skipped_and_reported(tmp_path, text_dir):
    (text_dir / "empty.txt").write_text("\n")
    lines = []
    meta = prepare(str(text_dir), tmp_path / "prep", progress=False, log=lines.append)
    assert sum(s["documents"] for s in meta["splits"].values()) == len(DOCS)
    assert "skipped 1 empty files" in lines[0] and "empty.txt" in lines[0]
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        list(documents(str(text_dir / "empty.txt")))
