"""Training throughput of an imported Hugging Face MoE under ds_moe_div vs plain transformers, in one run.

    python scripts/bench_hf.py [--family olmoe | --model-dir models/my_moe] [--batch 4 --seq 128 --steps 3 --repeats 5]

The same weights and the same batches twice: (a) ds_moe_div: `PretrainedMoELM` in a DeepSpeed engine with
the family's AutoEP block (EP=1, ZeRO-2, the shipped ds_configs/ds_zero2_cpu.json), a full `train_step`
with the baseline objectives (LM + L_aux), routing records included; (b) plain transformers with its
fastest experts implementation (`grouped_mm`), forward + backward + torch AdamW. Timed round-robin
(a, b, a, b, ...) so that drift of the machine hits both alike; prints median step time, tokens/s and the
median over rounds of the per-round ratio (ours / plain tokens/s) with its range. With --lora-r R (default
8; 0: off) a third variant, LoRA post-training (r=R on attention and experts, router frozen; hf/lora.py) of
the same model in its own engine, is timed in the same rounds, and the trainable parameters and Adam
state of full vs LoRA fine-tuning are printed (the memory a LoRA run saves, exact, not sampled). Without
--model-dir a tiny random model of --family is made in a temporary directory. Never asserted anywhere: a figure.

With --memory, a second section: peak host memory while an imported model is loaded, per EP rank, against
the rank's share of the weights (its tensors after loading: every non-expert tensor plus its experts).
Each measurement runs in a fresh subprocess: imports and one warm-up load first, freed memory returned to
the OS (malloc_trim), then the kernel's peak RSS (VmHWM) is reset (/proc/self/clear_refs) and the load
(`PretrainedMoELM.from_pretrained` + `convert(ep_size, ep_rank)`: AutoEP's layer replacement, as inside
`deepspeed.initialize`) runs; peak = VmHWM - RSS just before the load. Rows: the shard-by-shard path
(hf/shard_load.py, the default) at EP=1 and each rank of EP=--memory-ep, and the whole-model path
(transformers loads everything, AutoEP slices) for comparison. --experts / --expert-width / --hidden /
--layers make the random model larger (so that expert weights dominate); --no-throughput skips section one.
--memory also prints the peak host memory of a training process, full fine-tuning vs LoRA r=--lora-r (load,
engine and --steps steps of --batch x --seq tokens at EP=1; fresh subprocess each, VmHWM minus RSS after imports).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DS_CPU = ROOT / "ds_configs" / "ds_zero2_cpu.json"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="olmoe")
    p.add_argument("--model-dir", help="a local HF MoE directory (default: a tiny random model of --family)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the third variant (0: no LoRA variant)")
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--memory", action="store_true", help="also measure peak host memory while loading, per EP rank")
    p.add_argument("--memory-ep", type=int, default=2, help="the EP size of the --memory ranks")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput section")
    p.add_argument("--experts", type=int, help="routed experts of the random model (default: the tiny config's)")
    p.add_argument("--expert-width", type=int, help="expert width I of the random model")
    p.add_argument("--hidden", type=int, help="hidden size of the random model")
    p.add_argument("--layers", type=int, help="layers of the random model")
    p.add_argument("--measure-load", help=argparse.SUPPRESS)  # the subprocess of --memory: a model directory
    p.add_argument("--ep-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ep-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure-train", choices=("full", "lora"), help=argparse.SUPPRESS)  # with --measure-load
    return p.parse_args()


def random_model_overrides(args) -> dict:
    from ds_moe_div.hf.families import FAMILIES
    family = FAMILIES[args.family]
    picked = {family.num_experts_attr: args.experts, family.expert_width_attr: args.expert_width,
              "hidden_size": args.hidden, "num_hidden_layers": args.layers}
    return {k: v for k, v in picked.items() if v is not None}


def batches(vocab: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(2, vocab, (batch, seq + 1), generator=g)
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "domain_ids": torch.zeros(batch, seq, dtype=torch.long)}


def main():
    args = parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.measure_load and args.measure_train:
        print(json.dumps(measure_train(args.measure_load, args)))
        return
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, ep_size=args.ep_size, ep_rank=args.ep_rank,
                                      sharded=not args.whole)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model_dir) if args.model_dir else None
        if path is None:
            from ds_moe_div.hf.tiny import make_tiny
            overrides = random_model_overrides(args)
            path = make_tiny(family=args.family, out_dir=Path(tmp) / "m", overrides=overrides,
                             max_shard_size="100MB" if overrides else "64KB")
        if not args.no_throughput:
            throughput(args, path)
        if args.memory:
            memory_section(path, ep=args.memory_ep)
            train_memory_section(path, args)


def throughput(args, path: Path):
    import deepspeed

    from ds_moe_div.composer import ObjectiveComposer
    from ds_moe_div.config import ObjectivesConfig
    from ds_moe_div.distributed import init_distributed
    from ds_moe_div.ds_config import engine_config, load_ds_config
    from ds_moe_div.hf.load import load_pretrained
    from ds_moe_div.hf.model import PretrainedMoELM
    from ds_moe_div.log_window import LogWindow
    from ds_moe_div.train import train_step

    info = init_distributed()
    plain = load_pretrained(path).train()
    plain.set_experts_implementation("grouped_mm")
    ours = PretrainedMoELM(copy.deepcopy(plain), source=str(path))
    lora_model = PretrainedMoELM(copy.deepcopy(plain), source=str(path)) if args.lora_r else None
    ds = engine_config(load_ds_config(DS_CPU), args.batch, 1, info.world_size, steps=10**6)
    ds["expert_parallel"] = ours.autoep_block(ep_size=1)
    engine, *_ = deepspeed.initialize(model=ours, model_parameters=list(ours.parameters()), config=ds)
    ours.attach_routing()
    params = ds["optimizer"]["params"]
    opt = torch.optim.AdamW(plain.parameters(), lr=params["lr"], betas=params["betas"], eps=params["eps"],
                            weight_decay=params["weight_decay"])
    composer = ObjectiveComposer(ObjectivesConfig(), num_domains=1)
    data = batches(plain.config.vocab_size, args.batch, args.seq)

    def ours_step():
        train_step(engine, data, composer, LogWindow(), step=0)

    def plain_step():
        b = next(data)
        logits = plain(input_ids=b["input_ids"]).logits.float()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps = {"ds_moe_div (AutoEP, l_aux)": ours_step, "plain transformers (grouped_mm)": plain_step}
    if lora_model is not None:
        lora_engine = lora_variant(lora_model, ds, args.lora_r)
        steps[f"ds_moe_div LoRA r={args.lora_r}"] = lambda: train_step(lora_engine, data, composer, LogWindow(), step=0)
    times = {name: [] for name in steps}
    for round_id in range(args.repeats + 1):  # round 0 warms up
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if round_id:
                times[name].append((time.perf_counter() - start) / args.steps)
    tokens = args.batch * args.seq * info.world_size
    print(f"== {plain.config.model_type}: {sum(p.numel() for p in plain.parameters()) / 1e6:.2f}M params, "
          f"{args.batch}x{args.seq} tokens per step, {args.repeats} rounds x {args.steps} steps ==")
    print(f"{'':34s} {'step ms':>9s} {'tokens/s':>10s}")
    for name, ts in times.items():
        print(f"{name:34s} {1e3 * statistics.median(ts):9.1f} {tokens / statistics.median(ts):10.0f}")
    ours_t, plain_t, *lora_t = times.values()
    ratios = [p / o for o, p in zip(ours_t, plain_t)]  # tokens/s ours / plain = time plain / time ours
    print(f"ratio (ds_moe_div / plain tokens/s): {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds)")
    if lora_t:
        ratios = [f / lo for f, lo in zip(ours_t, lora_t[0])]
        print(f"ratio (LoRA / full fine-tuning tokens/s): {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds)")
        full, lora = _trainable(ours), _trainable(lora_model)
        print(f"trainable parameters: full {full:,}, LoRA {lora:,} ({lora / full:.1%}); Adam state (fp32 m, v): "
              f"full {8 * full / 2**20:.2f} MiB, LoRA {8 * lora / 2**20:.2f} MiB")


def lora_variant(model, ds: dict, r: int):
    """`model` with LoRA (hf/lora.py, r, alpha 2r, attention + experts, router frozen) in its own engine."""
    import deepspeed

    from ds_moe_div.config import LoraConfig
    from ds_moe_div.hf.lora import prepare

    prepare(model, LoraConfig(r=r, alpha=2.0 * r), ep_size=1, ep_rank=0, seed=0, verbose=False)
    config = {k: v for k, v in ds.items() if k != "expert_parallel"}  # the layers are converted already
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    model.attach_routing()
    return engine


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _release_freed_memory() -> None:
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_load(path: str, *, ep_size: int, ep_rank: int, sharded: bool) -> dict:
    """Peak RSS growth while loading `path` as EP rank `ep_rank` of `ep_size` (see the module docstring)."""
    from ds_moe_div.hf.model import PretrainedMoELM

    def load():
        model = PretrainedMoELM.from_pretrained(path, ep_size=ep_size, sharded=sharded)
        model.convert(ep_size=ep_size, ep_rank=ep_rank)
        return model

    warm = load()  # imports, lazily built modules, DeepSpeed's AutoEP: not part of the load's memory
    del warm
    _release_freed_memory()
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the kernel's peak RSS, to the current RSS
    model = load()
    peak = _kib("VmHWM")
    storages, expert_bytes = {}, 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        expert_bytes += t.nbytes if ".experts.w" in name else 0
    share = sum(storages.values())
    return {"share_bytes": share, "expert_bytes": expert_bytes, "peak_bytes": (peak - before) * 1024,
            "rss_before_bytes": before * 1024}


def memory_section(path: Path, *, ep: int) -> None:
    rows = [("shard by shard", 1, 0, False), *[("shard by shard", ep, r, False) for r in range(ep)],
            ("whole model (transformers, then AutoEP slices)", ep, 0, True)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"== peak host memory while loading {path.name} (fresh subprocess each; VmHWM reset via clear_refs, "
          f"minus RSS before the load) ==")
    print(f"{'path':48s} {'EP':>4s} {'rank':>4s} {'share MiB':>10s} {'experts MiB':>11s} {'peak MiB':>9s} "
          f"{'peak/share':>10s}")
    for label, ep_size, ep_rank, whole in rows:
        cmd = [sys.executable, __file__, "--measure-load", str(path), "--ep-size", str(ep_size),
               "--ep-rank", str(ep_rank), *(["--whole"] if whole else [])]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        mib = 2**20
        print(f"{label:48s} {ep_size:4d} {ep_rank:4d} {m['share_bytes'] / mib:10.2f} {m['expert_bytes'] / mib:11.2f} "
              f"{m['peak_bytes'] / mib:9.2f} {m['peak_bytes'] / m['share_bytes']:10.2f}")


def measure_train(path: str, args) -> dict:
    """Peak RSS growth of building the model, its engine (EP=1, ZeRO-2 config of the throughput section) and
    running --steps training steps, full fine-tuning or LoRA r=--lora-r: weights, gradients, optimizer state
    and activations together."""
    import deepspeed

    from ds_moe_div.composer import ObjectiveComposer
    from ds_moe_div.config import ObjectivesConfig
    from ds_moe_div.distributed import init_distributed
    from ds_moe_div.ds_config import engine_config, load_ds_config
    from ds_moe_div.hf.load import read_config
    from ds_moe_div.hf.model import PretrainedMoELM
    from ds_moe_div.log_window import LogWindow
    from ds_moe_div.train import train_step

    info = init_distributed()
    vocab = read_config(path)[0].vocab_size
    _release_freed_memory()
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    model = PretrainedMoELM.from_pretrained(path)
    ds = engine_config(load_ds_config(DS_CPU), args.batch, 1, info.world_size, steps=10**6)
    if args.measure_train == "lora":
        engine = lora_variant(model, ds, args.lora_r)
    else:
        ds["expert_parallel"] = model.autoep_block(ep_size=1)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
        model.attach_routing()
    composer = ObjectiveComposer(ObjectivesConfig(), num_domains=1)
    data = batches(vocab, args.batch, args.seq)
    for step in range(args.steps):
        train_step(engine, data, composer, LogWindow(), step=step)
    return {"peak_bytes": (_kib("VmHWM") - before) * 1024, "trainable": _trainable(model)}


def train_memory_section(path: Path, args) -> None:
    """Full fine-tuning vs LoRA: peak host memory of a training process (fresh subprocess each)."""
    if not args.lora_r:
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    peaks = {}
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--measure-load", str(path), "--measure-train", variant, "--batch",
               str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--lora-r", str(args.lora_r)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True).stdout
        peaks[variant] = json.loads(out.strip().splitlines()[-1])
    full, lora = peaks["full"], peaks["lora"]
    print(f"== peak host memory of training, EP=1, {args.batch}x{args.seq} tokens, {args.steps} steps (load + engine + "
          f"steps; fresh subprocess each) ==")
    print(f"full fine-tuning: {full['peak_bytes'] / 2**20:.2f} MiB ({full['trainable']:,} trainable); LoRA r="
          f"{args.lora_r}: {lora['peak_bytes'] / 2**20:.2f} MiB ({lora['trainable']:,} trainable); "
          f"ratio (LoRA / full): {lora['peak_bytes'] / full['peak_bytes']:.2f}, difference "
          f"{(full['peak_bytes'] - lora['peak_bytes']) / 2**20:.2f} MiB (both include the same one-time imports "
          f"and engine set-up)")


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    main()
