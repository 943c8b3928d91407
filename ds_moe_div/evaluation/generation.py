"""Text generation from a checkpoint (from scratch, or an imported `model.pretrained` run): greedy or
sampled (temperature, top-p), stops at the tokenizer's end-of-text token (<|eos|>, or a hub tokenizer's own).

    python -m ds_moe_div generate runs/tiny --prompt "def add(a, b):" [--max-new-tokens 64]
        [--temperature 0 (greedy) | 0.8 --top-p 0.95 --seed 0] [--checkpoint global_step200] [--stop "\\n\\n"]

One process, EP=1, for any checkpoint (an EP=2 run's experts are loaded into one process, as `eval` does).
No KV cache: each new token is one forward over the last seq_len tokens (the model's rotary tables end at
its training seq_len), so this is for inspection and small task sets, not throughput. Sampling draws from
`torch.Generator().manual_seed(seed)`: one seed, one text.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ds_moe_div.cli import prog


@dataclass(frozen=True)
class Generated:
    text: str  # the new text only (stop string excluded)
    token_ids: list[int]  # the new tokens (EOS excluded)
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens"


def next_token(logits_V: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """argmax when temperature == 0; else a draw from softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the token that crosses top_p is kept
    keep[0] = True
    nucleus = torch.where(keep, sorted_probs, 0.0)
    return int(order[torch.multinomial(nucleus / nucleus.sum(), 1, generator=generator)])


def generate(scorer, prompt: str | Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = ()) -> Generated:
    """Continue `prompt` (text, or token ids) with `scorer`'s model (a scoring.ModelScorer)."""
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1, temperature={temperature} >= 0 and "
                         f"top_p={top_p} in (0, 1]")
    ids = scorer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        ids = [scorer.eos_id]  # an empty prompt starts a new document
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([(ids + new)[-scorer.max_length:]])
        token = next_token(scorer.logits(window)[0, -1].cpu(), temperature=temperature, top_p=top_p,
                           generator=generator)
        if token == scorer.eos_id:
            return Generated(scorer.decode(new), new, "eos")
        new.append(token)
        text = scorer.decode(new)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            return Generated(text[:cut], new, "stop_string")
    return Generated(scorer.decode(new), new, "max_new_tokens")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog("generate"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run dir (its latest checkpoint), a checkpoints/ dir or a tag dir")
    parser.add_argument("--checkpoint", help="a tag of the run (global_step200)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable; \\n and \\t mean newline and tab)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from ds_moe_div.checkpoint import CheckpointError
    from ds_moe_div.evaluation.loading import load_model_only

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    args = parse_args(argv)
    try:
        scorer = load_model_only(args.path, tag=args.checkpoint).scorer()
        for i, prompt in enumerate(args.prompt):
            out = generate(scorer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed + i,
                           stop=[s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop])
            print(f"--- prompt {i} ({out.stop_reason}, {len(out.token_ids)} new tokens)")
            print(prompt + out.text)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"ds_moe_div generate: error: {e}", file=sys.stderr)
        return 2
    return 0
