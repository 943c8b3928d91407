"""prepare_data: corpus -> labels -> stratified splits -> BPE (train split) -> packed, cached memmaps.

    PYTHONPATH=. python -c "from ds_moe_div.data import DataConfig, prepare_data; print(prepare_data(DataConfig()).stats)"

Pure local work (no torch.distributed): call it on rank 0 first, then on the other ranks, which hit the
cache. The cache key covers the corpus identity, columns, label map, split settings, tokenizer settings
(or the given tokenizer file's hash), packing and seq_len; the trained tokenizer has its own key without
packing and seq_len, so changing those re-packs without retraining it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ds_moe_div import fileio, progress

from .cache import (
    MANIFEST,
    atomic_entry,
    file_digest,
    key_of,
    read_manifest,
)
from .config import DataConfig, cache_root
from .documents import (
    DUPLICATE,
    EMPTY,
    SUBSAMPLED,
    Scan,
    apply_label_options,
    iter_documents,
    label_options_key,
    scan_corpus,
)
from .errors import DataError
from .example_packing import ExampleStore, fit_to_row, pack_examples
from .examples import parse_example
from .instruction import InstructionEncoder
from .labels import load_label_map
from .packing import DocStore, pack_split
from .prepared import DataStats, PreparedData, load_prepared
from .readers import Source, resolve_source
from .special import folder_identity, special_token_ids
from .splits import SPLITS, assign_splits
from .tokenize import encode_documents, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
ENCODE_BATCH_DOCS = 512


def _keys(cfg: DataConfig, source: Source) -> tuple[str, str, dict]:
    """(tokenizer key, data key, the parts hashed into the data key)."""
    tok = cfg.tokenizer
    instruction = [cfg.format, cfg.messages_column, cfg.prompt_column, cfg.response_column, cfg.domain_column]
    parts = {
        "format": FORMAT_VERSION,
        "corpus": source.identity(cfg),
        "columns": [cfg.text_column, cfg.domain_column] if cfg.format == "text" else instruction,
        "labels": [load_label_map(cfg.label_map) if cfg.label_map else None, cfg.unknown_labels],
        "documents": [cfg.max_documents, cfg.val_fraction, cfg.test_fraction, cfg.split_seed],
        "tokenizer": {"sha256": file_digest(Path(tok.path).expanduser()),  # + what decides its EOS and template
                      "folder": folder_identity(Path(tok.path).expanduser().parent)} if tok.path else
                     [tok.vocab_size, tok.min_frequency, tok.max_train_mb],
    }
    tokenizer_key = key_of(parts)
    if label_options_key(cfg) is not None:  # after the tokenizer key: the options act after the tokenizer
        parts["label_options"] = label_options_key(cfg)
    parts["packing"] = [cfg.packing, cfg.seq_len]
    if cfg.format == "instruction":
        parts["loss_on"] = cfg.scored
    return tokenizer_key, key_of(parts), parts


def prepare_data(cfg: DataConfig, *, show_progress: bool = True) -> PreparedData:
    """The packed train/val/test splits of cfg's corpus, built once and then read from the cache.

    Raises DataError for unusable input (missing columns, unmapped labels, invalid UTF-8, a domain
    without documents in a split, ...), naming the file, the row and the fix.
    """
    source = resolve_source(cfg)
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path).expanduser().is_file():
        raise DataError(f"{cfg.tokenizer.path}: tokenizer file not found; fix tokenizer.path or set it to null")
    tokenizer_key, data_key, parts = _keys(cfg, source)
    root = cache_root(cfg)
    entry = root / data_key
    manifest = read_manifest(entry)
    if manifest is None:
        _build(cfg, source, entry, root / "tokenizers" / f"{tokenizer_key}.json", parts, show_progress)
        manifest = read_manifest(entry)
    return load_prepared(entry, manifest)


def _tokenizer(cfg: DataConfig, source: Source, scan: Scan, split_R: np.ndarray, cached: Path,
               show_progress: bool) -> Tokenizer:
    if cfg.tokenizer.path:  # a checkpoint's own tokenizer: its EOS and padding come from special.py
        return load_tokenizer(Path(cfg.tokenizer.path).expanduser(), project_tokens=False)
    if cached.is_file():
        return load_tokenizer(cached)
    chosen = _tokenizer_sample(scan.bytes_R, split_R, cfg.tokenizer.max_train_mb, cfg.split_seed)
    plain = (lambda text: parse_example(text).plain_text()) if cfg.format == "instruction" else (lambda text: text)
    texts = (plain(text) for row, text in iter_documents(source, cfg, scan) if chosen[row])
    tokenizer = train_tokenizer(texts, cfg.tokenizer, length=int(chosen.sum()), show_progress=show_progress)
    with fileio.atomic_path(cached) as tmp:
        tokenizer.save(str(tmp))
    return tokenizer


def _tokenizer_sample(bytes_R: np.ndarray, split_R: np.ndarray, max_mb: float | None, seed: int) -> np.ndarray:
    """Rows the tokenizer trains on: the train split, or a seeded random part of it up to max_mb."""
    chosen = split_R == 0
    if max_mb is None or bytes_R[chosen].sum() <= max_mb * 1e6:
        return chosen
    order = np.random.default_rng([seed, 3]).permutation(np.flatnonzero(chosen))
    keep = order[: max(1, int(np.searchsorted(np.cumsum(bytes_R[order]), max_mb * 1e6, side="right")))]
    chosen = np.zeros(len(split_R), dtype=bool)
    chosen[keep] = True
    return chosen


def _encode_examples(encoder: InstructionEncoder, texts: list[str], where: list[str], width: int,
                     counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, lengths, kept) of instruction examples cut to one row (example_packing.fit_to_row);
    counts[0] += truncated, counts[1] += dropped."""
    fitted = [fit_to_row(ids, mask, width) for ids, mask in encoder.encode_batch(texts, where)]
    kept = np.array([f is not None for f in fitted], dtype=bool)
    fitted = [f for f in fitted if f is not None]
    counts += [sum(f[2] for f in fitted), int((~kept).sum())]
    if not fitted:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64), kept
    return (np.concatenate([f[0] for f in fitted]), np.concatenate([f[1] for f in fitted]),
            np.array([len(f[0]) for f in fitted], dtype=np.int64), kept)


def _tokenize(cfg: DataConfig, source: Source, scan: Scan, split_R: np.ndarray, tokenizer: Tokenizer, eos_id: int,
              stores: dict[str, DocStore], show_progress: bool,
              encoder: InstructionEncoder | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode every used document (batch API, per split) into its split's store; instruction examples
    through `encoder` (with their loss masks, each cut to one row).

    Returns documents and tokens per (split, domain), and [truncated, dropped] examples per split."""
    shape = (len(SPLITS), len(scan.scheme.domain_names))
    docs, tokens = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    cut = np.zeros((len(SPLITS), 2), np.int64)
    pending: list[list[tuple[int, str]]] = [[] for _ in SPLITS]

    def flush(s: int) -> None:
        rows = [row for row, _ in pending[s]]
        if encoder is None:
            ids, lengths = encode_documents(tokenizer, [text for _, text in pending[s]], eos_id)
            domains, mask = scan.domain_R[rows], None
        else:
            where = [f"{cfg.corpus} example {row + 1}" for row in rows]  # rows of the corpus, from 1
            ids, mask, lengths, kept = _encode_examples(encoder, [text for _, text in pending[s]], where,
                                                        cfg.seq_len + 1, cut[s])
            domains = scan.domain_R[rows][kept]
        stores[SPLITS[s]].add(ids, lengths, domains, *([] if mask is None else [mask]))
        np.add.at(docs[s], domains, 1)
        np.add.at(tokens[s], domains, lengths)
        pending[s] = []

    documents = progress.wrap(iter_documents(source, cfg, scan), total=int((split_R >= 0).sum()), desc="tokenize",
                              unit="doc", enabled=show_progress)
    for row, text in documents:
        s = int(split_R[row])
        pending[s].append((row, text))
        if len(pending[s]) >= ENCODE_BATCH_DOCS:
            flush(s)
    for s in range(len(SPLITS)):
        if pending[s]:
            flush(s)
    return docs, tokens, cut


def _example_stats(cut: np.ndarray, packed: dict) -> dict:
    return {"truncated_examples": dict(zip(SPLITS, cut[:, 0].tolist(), strict=True)),
            "dropped_examples": dict(zip(SPLITS, cut[:, 1].tolist(), strict=True)),
            "scored_tokens": {name: packed[name]["scored_tokens"] for name in SPLITS}}


def _build(cfg: DataConfig, source: Source, entry: Path, tokenizer_cache: Path, parts: dict,
           show_progress: bool) -> None:
    start = time.perf_counter()
    if cfg.tokenizer.path:  # a given tokenizer without any EOS is refused before the corpus is read
        path = Path(cfg.tokenizer.path).expanduser()
        special_token_ids(load_tokenizer(path, project_tokens=False), path.parent, source=path)
    scan = scan_corpus(source, cfg, show_progress=show_progress)
    names = scan.scheme.domain_names
    split_R = assign_splits(scan.domain_R, names, val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    with atomic_entry(entry) as tmp:
        tokenizer = _tokenizer(cfg, source, scan, split_R, tokenizer_cache, show_progress)
        tokenizer.save(str(tmp / "tokenizer.json"))
        scan, split_R = apply_label_options(scan, split_R, cfg)
        names = scan.scheme.domain_names
        folder = Path(cfg.tokenizer.path).expanduser().parent if cfg.tokenizer.path else None
        special = special_token_ids(tokenizer, folder, source=cfg.tokenizer.path or tokenizer_cache)
        pad_id, eos_id = special.pad_id, special.eos_id
        instruction = cfg.format == "instruction"
        encoder = InstructionEncoder(tokenizer, eos_id=eos_id, template_dir=folder, scored=cfg.scored) \
            if instruction else None
        stores = {name: (ExampleStore if instruction else DocStore)(tmp / f"{name}.docs.bin") for name in SPLITS}
        docs, tokens, cut = _tokenize(cfg, source, scan, split_R, tokenizer, eos_id, stores, show_progress, encoder)
        packed = {}
        for s, name in enumerate(SPLITS):
            pack = pack_examples if instruction else pack_split
            packed[name] = pack(stores[name], tmp, name, packing=cfg.packing, seq_len=cfg.seq_len,
                                pad_id=pad_id, num_domains=len(names), seed=cfg.split_seed + s)
            stores[name].unlink()
        stats = DataStats(
            documents={n: dict(zip(names, docs[s].tolist(), strict=True)) for s, n in enumerate(SPLITS)},
            tokens={n: dict(zip(names, tokens[s].tolist(), strict=True)) for s, n in enumerate(SPLITS)},
            sequences={n: packed[n]["sequences"] for n in SPLITS},
            padding_tokens={n: packed[n]["padding_tokens"] for n in SPLITS},
            rows_read=len(scan.domain_R), empty_skipped=scan.count(EMPTY),
            duplicates_skipped=scan.count(DUPLICATE), subsampled_out=scan.count(SUBSAMPLED),
            unknown_as_other=scan.scheme.unknown_as_other, build_seconds=round(time.perf_counter() - start, 3),
            **(_example_stats(cut, packed) if instruction else {}))
        if instruction and show_progress and cut.any():
            print(f"prepare_data: instruction examples longer than seq_len+1={cfg.seq_len + 1} tokens: "
                  f"{dict(zip(SPLITS, cut[:, 0].tolist(), strict=True))} truncated, "
                  f"{dict(zip(SPLITS, cut[:, 1].tolist(), strict=True))} dropped (no response token left); "
                  "raise data.seq_len to keep them", flush=True)
        fileio.write_json(tmp / MANIFEST, indent=1, default=str, data={
            "format": FORMAT_VERSION, "key_parts": parts, "config": dataclasses.asdict(cfg),
            "domain_names": list(names), "pad_id": pad_id, "eos_id": eos_id, "eos_from": special.eos_from,
            "vocab_size": tokenizer.get_vocab_size(), "seq_len": cfg.seq_len, "packing": cfg.packing,
            "stats": stats.to_dict()})
