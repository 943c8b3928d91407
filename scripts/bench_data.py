"""Data pipeline throughput: corpus build, BPE training, batch tokenisation, prepare_data (cold and
cached), loader, and the loader's tokens/s against the trainer's (target: loader >= 20x trainer).

    .venv/bin/python scripts/bench_data.py                     # on the committed fixture
    .venv/bin/python scripts/bench_data.py --corpus builtin --corpus-dir data/builtin --repeat 1 \
        --build-corpus lite --mb-per-subdomain 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_moe_div.data import BatchLoader, DataConfig, TokenizerConfig, prepare_data
from ds_moe_div.data.documents import scan_corpus
from ds_moe_div.data.readers import resolve_source
from ds_moe_div.data.tokenize import encode_documents, special_ids, train_tokenizer


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="fixture")
    parser.add_argument("--corpus-dir", default=None)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=8, help="tokenise the corpus this many times (small corpora)")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--loader-steps", type=int, default=2000)
    parser.add_argument("--build-corpus", choices=("lite", "full"), default=None,
                        help="first (re)build the built-in corpus into --corpus-dir and time it (uses the cache)")
    parser.add_argument("--mb-per-subdomain", type=float, default=1.0)
    args = parser.parse_args()
    if args.build_corpus:
        bench_corpus_build(args)

    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(corpus=args.corpus, corpus_dir=args.corpus_dir, cache_dir=cache, seq_len=args.seq_len,
                         tokenizer=TokenizerConfig(vocab_size=args.vocab_size))
        scan = scan_corpus(resolve_source(cfg), cfg, show_progress=False)
        texts = [t for t, d in zip(scan.texts, scan.domain_R.tolist(), strict=True) if d >= 0]
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        print(f"corpus: {len(texts)} documents, {n_bytes / 1e6:.2f} MB, {os.cpu_count()} CPUs")

        tokenizer, seconds = timed(lambda: train_tokenizer(texts, cfg.tokenizer, show_progress=False))
        print(f"BPE training (vocab {tokenizer.get_vocab_size()}, all documents): {seconds:.2f} s, "
              f"{n_bytes / 1e6 / seconds:.2f} MB/s")

        _, eos = special_ids(tokenizer)
        many = texts * args.repeat
        ids, seconds = timed(lambda: [tokenizer.encode(t).ids for t in texts])
        one_by_one = sum(map(len, ids)) / seconds
        batches = [many[i:i + 512] for i in range(0, len(many), 512)]
        results, seconds = timed(lambda: [encode_documents(tokenizer, b, eos) for b in batches])
        n_tokens = sum(len(r[0]) for r in results)
        print(f"tokenisation: encode() one by one {one_by_one / 1e6:.2f} M tokens/s; encode_batch_fast "
              f"(512 docs/batch) {n_tokens / seconds / 1e6:.2f} M tokens/s ({n_bytes * args.repeat / seconds / 1e6:.1f} "
              f"MB/s, {n_bytes * args.repeat / n_tokens:.2f} bytes/token)")

        data, cold = timed(lambda: prepare_data(cfg, show_progress=False))
        _, warm = timed(lambda: prepare_data(cfg, show_progress=False))
        print(f"prepare_data: cold {cold:.2f} s ({data.stats.build_seconds:.2f} s build), cache hit {warm * 1e3:.1f} ms; "
              f"train {len(data.splits['train'])} x {args.seq_len + 1} tokens")

        loader = BatchLoader(data.splits["train"], micro_batch_size=args.micro_batch_size, seed=0)
        _, seconds = timed(lambda: [next(loader) for _ in range(args.loader_steps)])
        print(f"BatchLoader (micro {args.micro_batch_size}, natural): "
              f"{args.loader_steps * args.micro_batch_size * args.seq_len / seconds / 1e6:.2f} M tokens/s, "
              f"{seconds / args.loader_steps * 1e6:.0f} us/batch")
        loader_tps = args.loader_steps * args.micro_batch_size * args.seq_len / seconds
        trainer_tps = trainer_tokens_per_s(data.vocab_size, args.seq_len)
        print(f"trainer (tiny config, fwd+bwd+AdamW, 1 process): {trainer_tps:.0f} tokens/s; "
              f"loader / trainer = {loader_tps / trainer_tps:.0f}x (target >= 20x)")


def bench_corpus_build(args) -> None:
    from ds_moe_div.corpus import build_corpus

    out = Path(args.corpus_dir or "data/builtin")
    path, seconds = timed(lambda: build_corpus(out, mb_per_subdomain=args.mb_per_subdomain, tier=args.build_corpus,
                                               show_progress=False))
    mb = sum(len(line) for line in _jsonl_texts(path)) / 1e6
    print(f"corpus build ({args.build_corpus}, {args.mb_per_subdomain} MB/subdomain, cache as found): "
          f"{seconds:.1f} s, {mb:.1f} MB of text, {mb / seconds:.2f} MB/s")


def _jsonl_texts(path):
    import gzip
    import json

    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"].encode("utf-8")


def trainer_tokens_per_s(vocab: int, seq_len: int, micro: int = 8, steps: int = 5) -> float:
    """The tiny experiment's model (d=128, 4 layers, 8 experts, top-2) on this process's threads."""
    import torch

    from ds_moe_div.config import load_experiment
    from ds_moe_div.model import MoELanguageModel

    cfg = load_experiment(Path(__file__).resolve().parents[1] / "ds_configs/experiments/tiny.json").model
    model = MoELanguageModel(cfg, vocab_size=vocab, seq_len=seq_len, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (micro, seq_len))

    def step():
        model(ids, labels_BS=ids).lm_loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    _, seconds = timed(lambda: [step() for _ in range(steps)])
    return steps * micro * seq_len / seconds


if __name__ == "__main__":
    main()
