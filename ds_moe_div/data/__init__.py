"""Domain-labelled data for MoE training: a domain id for every token.

    from ds_moe_div.data import DataConfig, prepare_data, BatchLoader, check_enough
    data = prepare_data(DataConfig(corpus="fixture", seq_len=256))
    loader = BatchLoader(data.splits["train"], micro_batch_size=8, rank=rank, world_size=world_size)

Modules: config (settings), readers (JSONL/Parquet/datasets rows), labels (label maps), documents (the
validating pass), splits (stratified split), tokenize (byte-level BPE), special (EOS and padding of any
tokenizer), packing (rows + domain ids), cache (keys, atomic entries), prepare (the pipeline), prepared
(result types), loader (batches). Instruction data (format "instruction"): examples (rows as examples),
instruction (chat template, loss mask), example_packing (whole examples per row).
"""

from .config import DataConfig, TokenizerConfig
from .errors import DataError
from .loader import IGNORE_INDEX, BatchLoader, check_enough
from .prepare import prepare_data
from .prepared import DataStats, PackedSplit, PreparedData
from .tokenize import load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BatchLoader",
    "DataConfig",
    "DataError",
    "DataStats",
    "PackedSplit",
    "PreparedData",
    "TokenizerConfig",
    "check_enough",
    "load_tokenizer",
    "prepare_data",
]
