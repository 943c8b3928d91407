"""Step time of one experiment config on the two MoE paths, in one run: `model.backend` "native"
(DeepSpeed's capacity-based MoE layer, ds_moe_div/model.py) vs "autoep" (the same config as a qwen3_moe
`from_config` model on DeepSpeed's dropless AutoEP layer, ds_moe_div/hf/scratch.py).

    python scripts/bench_paths.py [--config ds_configs/experiments/tiny.json] [--steps 3 --repeats 5]
                                  [--override data.corpus=fixture ...]

Each side is a full trainer state from `ds_moe_div.session.build` (the shipped ZeRO-2 CPU ds_config,
AdamW, the config's objectives and routing statistics), built with the same seed, so both draw the same
batches; a step is `train.train_step` (forward, the composed loss, backward, optimizer step). Timed
round-robin (native, autoep, native, ...) so that drift of the machine hits both alike; prints the median
ms/step of each, the median over rounds of the per-round ratio (autoep / native time) with its range,
and the 1-minute load average before and after. Without the built-in corpus on disk (corpus.jsonl.gz in
data.corpus_dir, made by scripts/prepare_corpus.py) it falls back to the committed fixture corpus and
says so. A figure, never asserted anywhere.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DS_CPU = ROOT / "ds_configs" / "ds_zero2_cpu.json"
BACKENDS = ("native", "autoep")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "ds_configs" / "experiments" / "tiny.json"))
    p.add_argument("--override", action="append", default=[], help="a.b=v, applied to both sides")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds (one more warms up)")
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def data_overrides(config: str, overrides: list[str]) -> list[str]:
    """`data.corpus=fixture` when the config wants the built-in corpus and it has not been built."""
    from ds_moe_div.config import load_experiment
    data = load_experiment(config, overrides).data
    if data.corpus == "builtin" and not (Path(data.corpus_dir) / "corpus.jsonl.gz").is_file():
        print(f"note: no built-in corpus in {data.corpus_dir} (scripts/prepare_corpus.py builds it): "
              f"using the fixture corpus", flush=True)
        return ["data.corpus=fixture"]
    return []


def build_side(backend: str, args, extra: list[str], tmp: str):
    from ds_moe_div.config import load_experiment
    from ds_moe_div.ds_config import load_ds_config
    from ds_moe_div.session import build
    cfg = load_experiment(args.config, [*args.override, *extra, f"model.backend={backend}",
                                        f"train.run_dir={tmp}/{backend}", "train.show_progress=false"])
    return build(cfg, load_ds_config(DS_CPU))


def main():
    args = parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ds_moe_div.train import train_step

    load_before = os.getloadavg()[0]
    extra = data_overrides(args.config, args.override)
    times = {b: [] for b in BACKENDS}
    with tempfile.TemporaryDirectory() as tmp:
        states = {b: build_side(b, args, extra, tmp) for b in BACKENDS}
        for round_id in range(args.repeats + 1):  # round 0 warms up
            for backend, state in states.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step)
                    state.step += 1
                    state.window.reset()
                if round_id:
                    times[backend].append((time.perf_counter() - start) / args.steps)
        params = {b: sum(p.numel() for p in s.engine.module.parameters()) for b, s in states.items()}
        for state in states.values():
            state.close()
    cfg = states["native"].cfg
    print(f"== {Path(args.config).name}: d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, "
          f"{cfg.model.moe.num_experts} experts top-{cfg.model.moe.k}, micro batch {states['native'].micro_batch_size}"
          f" x seq {cfg.data.seq_len}, world size {states['native'].info.world_size}; {args.repeats} rounds x "
          f"{args.steps} steps ==")
    print(f"{'':8s} {'params':>10s} {'ms/step':>9s}")
    for backend, ts in times.items():
        print(f"{backend:8s} {params[backend]:10d} {1e3 * statistics.median(ts):9.1f}")
    ratios = [a / n for n, a in zip(times["native"], times["autoep"])]
    print(f"ratio (autoep / native step time): {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds)")
    print(f"load average (1 min): {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
