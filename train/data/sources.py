"""Documents from the user's files: text files (one document each), JSONL (one per line),
Parquet (one per row) and Hugging Face `datasets` directories written by `save_to_disk`.

`documents(spec, text_field)` yields (document id, text) in a fixed order; the id
(file path relative to the input, plus line or row) decides the train/validation split.
Every problem a user can cause raises DataError with one line naming the file and field.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from train.errors import DataError


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def expand(spec: str) -> list[tuple[Path, str]]:
    """(file or HF dataset dir, its id prefix) for a path, a directory or a glob, sorted."""
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(spec, recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file() or is_hf_dataset(Path(m))]
        if not files:
            raise DataError(f"data input {spec!r} matches no files")
        base = Path(os.path.commonpath([str(f.parent) for f in files]))
        return [(f, f.relative_to(base).as_posix()) for f in files]
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data input {spec!r} does not exist")
    if path.is_file() or is_hf_dataset(path):
        return [(path, path.name)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"directory {spec!r} holds no files")
    return [(f, f.relative_to(path).as_posix()) for f in files]


class EmptyFileError(DataError):
    """A file without any text."""


def documents(spec: str, text_field: str = "text", skipped: list[str] | None = None
              ) -> Iterator[tuple[str, str]]:
    """(id, text) of every document. An empty file is an error when it is the whole
    input; among several files it is skipped and its path appended to `skipped`."""
    files = expand(spec)
    for path, name in files:
        try:
            if is_hf_dataset(path):
                yield from hf_dataset_documents(path, name, text_field)
            elif path.suffix == ".jsonl":
                yield from jsonl_documents(path, name, text_field)
            elif path.suffix == ".parquet":
                yield from parquet_documents(path, name, text_field)
            else:
                yield name, read_text(path)
        except EmptyFileError:
            if len(files) == 1:
                raise
            if skipped is not None:
                skipped.append(str(path))


def decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: bytes {e.start}-{e.end} are not UTF-8; convert the file "
                        "to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise EmptyFileError(f"{path}: the file is empty; remove it or fill it")
    if b"\0" in data[:8192]:  # as git tells binary files: text has no NUL bytes
        raise DataError(f"{path}: binary, not text: leave it out of the input (or use a glob "
                        "that matches only the text files)")
    return decode(data, str(path))


def jsonl_documents(path: Path, name: str, field: str) -> Iterator[tuple[str, str]]:
    count = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(decode(raw, where))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where}: no field {field!r} (has: {keys}); set "
                                "data.text_field to the field holding the text")
            if not isinstance(record[field], str):
                raise DataError(f"{where}: field {field!r} is "
                                f"{type(record[field]).__name__}, not text")
            count += 1
            yield f"{name}:{number}", record[field]
    if not count:
        raise EmptyFileError(f"{path}: the file is empty; remove it or fill it")


def _column(table, path, field: str):
    if field not in table.column_names:
        raise DataError(f"{path}: no column {field!r} (has: {', '.join(table.column_names)}); "
                        "set data.text_field to the column holding the text")
    column = table.column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{path}: column {field!r} is {column.type}, not text")
    return column


def parquet_documents(path: Path, name: str, field: str) -> Iterator[tuple[str, str]]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - a corrupt or non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    column = _column(table, path, field)
    if not len(column):
        raise EmptyFileError(f"{path}: the file is empty; remove it or fill it")
    for row, text in enumerate(column.to_pylist()):
        yield f"{name}:{row}", text or ""


def _dataset_tables(path: Path, name: str) -> Iterator[tuple[Path, str, Path, pa.Table]]:
    """(directory, name, shard file, its table) of a `datasets` save_to_disk directory,
    read with pyarrow (its shards are Arrow IPC streams listed in state.json). A
    DatasetDict is read from its "train" split."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if "train" not in splits:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has: "
                            f"{', '.join(splits)}); point data.path at {path}/<split>")
        path, name = path / "train", f"{name}/train"
    state = json.loads((path / "state.json").read_text())
    for shard in state["_data_files"]:
        with pa.memory_map(str(path / shard["filename"])) as source:
            yield path, name, path / shard["filename"], pa.ipc.open_stream(source).read_all()


def hf_dataset_documents(path: Path, name: str, field: str) -> Iterator[tuple[str, str]]:
    """The `field` texts of a `datasets` save_to_disk directory (_dataset_tables)."""
    row = 0
    for _, split_name, shard, table in _dataset_tables(path, name):
        for text in _column(table, shard, field).to_pylist():
            yield f"{split_name}:{row}", text or ""
            row += 1
    if not row:
        raise DataError(f"{path}: the dataset has no rows")


def records(spec: str) -> Iterator[tuple[str, str, dict]]:
    """(id, where, row) of every row of JSONL, Parquet or `datasets` inputs, each row a
    dict of its fields (for chat and preference data); `where` names the file and line
    or row for messages."""
    for path, name in expand(spec):
        if is_hf_dataset(path):
            yield from _dataset_records(path, name)
        elif path.suffix == ".jsonl":
            with path.open("rb") as f:
                for number, raw in enumerate(f, 1):
                    if raw.strip():
                        where = f"{path} line {number}"
                        try:
                            row = json.loads(decode(raw, where))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                        if not isinstance(row, dict):
                            raise DataError(f"{where}: a JSON {type(row).__name__}, not an "
                                            "object of fields")
                        yield f"{name}:{number}", where, row
        elif path.suffix == ".parquet":
            try:
                table = pq.read_table(path)
            except Exception as e:  # noqa: BLE001 - a corrupt or non-Parquet file
                raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__})"
                                ) from None
            for number, row in enumerate(table.to_pylist()):
                yield f"{name}:{number}", f"{path} row {number}", row
        else:
            raise DataError(f"{path}: chat and preference data is read from .jsonl, .parquet "
                            "or `datasets` directories, not text files")


def _dataset_records(path: Path, name: str) -> Iterator[tuple[str, str, dict]]:
    number = 0
    for split_path, split_name, _, table in _dataset_tables(path, name):
        for row in table.to_pylist():
            yield f"{split_name}:{number}", f"{split_path} row {number}", row
            number += 1


def first_record(spec: str) -> dict | None:
    """The first row of the first JSONL, Parquet or `datasets` input (None for text
    files): what data.format=auto tells the kind of data by."""
    path, _ = expand(spec)[0]
    if not (path.suffix in (".jsonl", ".parquet") or is_hf_dataset(path)):
        return None
    return next((row for _, _, row in records(str(path))), None)
