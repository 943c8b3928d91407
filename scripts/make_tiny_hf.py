"""Write a tiny random Hugging Face MoE checkpoint (no model hub needed), to try the post-training path.

    python scripts/make_tiny_hf.py --family olmoe --out models/tiny_olmoe [--seed 0] [--overwrite]

Families: mixtral, qwen2_moe, olmoe, qwen3_moe, deepseek_v2, deepseek_v3. The directory holds config.json,
sharded safetensors with their index (hub per-expert layout), generation_config.json and a tiny byte-level
BPE tokenizer with <|pad|> and <|eos|>; routers are non-trivial (see ds_moe_div/hf/tiny.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_moe_div.hf.families import SUPPORTED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=SUPPORTED, default="olmoe")
    parser.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"make_tiny_hf: error: {out} is not empty; choose another --out or pass --overwrite", file=sys.stderr)
        return 2
    from ds_moe_div.hf.tiny import make_tiny
    make_tiny(family=args.family, out_dir=out, seed=args.seed)
    print(f"wrote a tiny random {args.family} model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
