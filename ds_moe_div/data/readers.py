"""Read a corpus as rows of (text, raw label, source, row): JSONL (.gz), Parquet, or `datasets`.

Every reader streams: JSONL line by line, Parquet batch by batch, `datasets` row by row (with
streaming=True it never materialises the corpus). Rows count from 1. With data.format "instruction" the
text of a row is its example as canonical JSON (examples.py). A missing column, a non-string
text or invalid UTF-8 raises DataError naming the file, the row and the fix.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataConfig
from .errors import DataError, at
from .examples import canonical_example

FIXTURE = Path(__file__).resolve().parent.parent / "assets" / "mini_corpus.jsonl.gz"
BUILTIN_FILE = "corpus.jsonl.gz"
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
PARQUET_BATCH = 1024

Row = tuple[str, Any, str, int]  # text, raw label, source name, row number


@dataclass(frozen=True)
class Source:
    """A resolved corpus: local files read by this module, or a `datasets` name read through it."""

    files: tuple[Path, ...] = ()
    hf_name: str | None = None
    fixture: bool = False

    def identity(self, cfg: DataConfig) -> dict:
        """What the cache key sees: the fixture's content hash, local files' paths+sizes+mtimes, or a name."""
        from .cache import file_digest

        if self.fixture:
            return {"fixture_sha256": file_digest(self.files[0])}
        if self.files:
            return {"files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]}
        local = Path(str(self.hf_name)).expanduser()
        stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(local.rglob("*")) if p.is_file()]
        return {"datasets": self.hf_name, "config": cfg.hf_config, "split": cfg.hf_split, "local_files": stats}


def resolve_source(cfg: DataConfig) -> Source:
    if cfg.corpus == "fixture":
        if not FIXTURE.is_file():
            raise DataError(f"{FIXTURE}: the committed mini corpus is missing; restore it from git "
                            "(git checkout -- ds_moe_div/assets) or set corpus to a file path")
        return Source(files=(FIXTURE,), fixture=True)
    if cfg.corpus == "builtin":
        path = Path(str(cfg.corpus_dir)).expanduser() / BUILTIN_FILE
        if not path.is_file():
            raise DataError(f"{path}: no built-in corpus there; build it first "
                            "(python scripts/prepare_corpus.py --out DIR) "
                            "or point corpus_dir at the folder it wrote")
        return Source(files=(path,))
    path = Path(cfg.corpus).expanduser()
    if path.is_file():
        if not path.name.endswith(FILE_SUFFIXES):
            raise DataError(f"{path}: unknown file type; use .jsonl, .jsonl.gz or .parquet")
        return Source(files=(path,))
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES)))
        if files:
            return Source(files=files)
    elif cfg.corpus.endswith(FILE_SUFFIXES) or cfg.corpus.startswith(("/", "./", "../", "~")):
        raise DataError(f"{path}: no such file or folder; check corpus (a path, \"fixture\", \"builtin\" "
                        "or a datasets name)")
    return Source(hf_name=cfg.corpus)


def get_field(record: Any, dotted: str) -> Any:
    """record["a"]["b"] for "a.b"; raises KeyError(dotted) when any level is missing."""
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _missing(source: str, row: int, column: str, record: Any, option: str) -> DataError:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    return DataError(f"{at(source, row)}: no column {column!r} (row has {keys}); set {option} to the column "
                     "that holds it (dotted for nested fields, e.g. meta.pile_set_name)")


def _extract_example(record: Any, cfg: DataConfig, source: str, row: int) -> Row:
    """An instruction row: its example as canonical JSON text (examples.py) and its label."""
    fields = {}
    for column in (cfg.messages_column, cfg.prompt_column, cfg.response_column):
        try:
            fields[column] = get_field(record, column)
        except KeyError:
            pass
    try:
        label = get_field(record, cfg.domain_column)
    except KeyError:
        raise _missing(source, row, cfg.domain_column, record, "domain_column") from None
    return canonical_example(fields, cfg, source=source, row=row), label, source, row


def _extract(record: Any, cfg: DataConfig, source: str, row: int) -> Row:
    if cfg.format == "instruction":
        return _extract_example(record, cfg, source, row)
    try:
        text = get_field(record, cfg.text_column)
    except KeyError:
        raise _missing(source, row, cfg.text_column, record, "text_column") from None
    try:
        label = get_field(record, cfg.domain_column)
    except KeyError:
        raise _missing(source, row, cfg.domain_column, record, "domain_column") from None
    if isinstance(text, bytes):
        text = _decode(text, source, row)
    if not isinstance(text, str):
        raise DataError(f"{at(source, row)}: column {cfg.text_column!r} holds {type(text).__name__}, not text; "
                        "point text_column at a string column")
    return text, label, source, row


def _decode(raw: bytes, source: str, row: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{at(source, row)}: invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r}); "
                        "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _jsonl_rows(path: Path, cfg: DataConfig) -> Iterator[Row]:
    source = str(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for row, raw in enumerate(f, 1):
                line = _decode(raw, source, row)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{at(source, row)}: not valid JSON ({e.msg} at column {e.colno}); "
                                    "each line must be one JSON object") from None
                yield _extract(record, cfg, source, row)
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{source}: file not found; check the corpus path") from None
        raise DataError(f"{source}: cannot read ({e}); a truncated .gz? rebuild or re-download it") from None


def _parquet_rows(path: Path, cfg: DataConfig) -> Iterator[Row]:
    import pyarrow.parquet as pq

    source = str(path)
    pfile = pq.ParquetFile(path)
    names = pfile.schema_arrow.names
    columns = []
    if cfg.format == "instruction":  # whichever example columns the file has; each row is checked
        columns = [c.split(".")[0] for c in (cfg.messages_column, cfg.prompt_column, cfg.response_column)
                   if c.split(".")[0] in names]
    for column, option in _parquet_required(cfg):
        top = column.split(".")[0]
        if top not in names:
            raise DataError(f"{at(source, 1)}: no column {column!r} (file has {names}); set {option} "
                            "to the column that holds it (dotted for nested fields)")
        columns.append(top)
    row = 0
    for batch in pfile.iter_batches(batch_size=PARQUET_BATCH, columns=sorted(set(columns))):
        try:
            records = batch.to_pylist()
        except UnicodeDecodeError as e:
            raise DataError(f"{at(source, row + 1)}: invalid UTF-8 in rows {row + 1}..{row + len(batch)} ({e.reason}); "
                            "rewrite the column as valid UTF-8") from None
        for record in records:
            row += 1
            yield _extract(record, cfg, source, row)


def _parquet_required(cfg: DataConfig) -> tuple[tuple[str, str], ...]:
    if cfg.format == "instruction":
        return ((cfg.domain_column, "domain_column"),)
    return (cfg.text_column, "text_column"), (cfg.domain_column, "domain_column")


def _datasets_rows(name: str, cfg: DataConfig) -> Iterator[Row]:
    import datasets

    kwargs: dict[str, Any] = {"split": cfg.hf_split, "streaming": cfg.streaming}
    if not cfg.streaming and cfg.num_proc > 1 and os.path.isdir(name):
        kwargs["num_proc"] = cfg.num_proc
    try:
        dataset = datasets.load_dataset(name, cfg.hf_config, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (not found, offline, bad config)
        raise DataError(f"{name}: not a local .jsonl/.jsonl.gz/.parquet file or folder, and datasets could not "
                        f"load it ({type(e).__name__}: {e}); check the corpus path or name, hf_config, "
                        "hf_split") from None
    source = f"{name}[{cfg.hf_split}]"
    for row, record in enumerate(dataset, 1):
        yield _extract(record, cfg, source, row)


def iter_rows(source: Source, cfg: DataConfig) -> Iterator[Row]:
    """Every row of the corpus, in a fixed order (files sorted by path)."""
    if source.hf_name is not None:
        yield from _datasets_rows(source.hf_name, cfg)
        return
    for path in source.files:
        if path.name.endswith(".parquet"):
            yield from _parquet_rows(path, cfg)
        else:
            yield from _jsonl_rows(path, cfg)
