"""ds_moe_div against plain DeepSpeed-MoE, and 1 -> 2 rank scaling with EP=1 and EP=2, measured in one run.

    python scripts/bench_scaling.py [--d-model 128 --layers 4 --experts 8 --k 2 --batch 8 --seq 128
                                     --steps 5 --repeats 5] [--skip-plain] [--skip-scaling]

1. Overhead over plain DeepSpeed-MoE, in this process: the same decoder twice, with the same initial
   weights and the same batches. "plain" swaps the FFN for stock `deepspeed.moe.layer.MoE` (same SwiGLU
   expert) and its step is `engine.backward(lm + 0.01 * l_aux); engine.step()`, nothing of ours. "ours"
   is ds_moe_div's baseline: `ds_moe_div.train.train_step` with the ObjectiveComposer (balance.coef=0.01
   only) and a LogWindow without routing statistics. Two engines, timed round-robin in blocks of
   --steps (the order alternates each round); prints the median step times and their ratio (target:
   ours within 3% of plain).
2. Scaling: the real launcher (`deepspeed --num_gpus N scripts/bench_scaling.py --ranks-worker ...`)
   runs 1 rank EP=1, 2 ranks EP=1, 2 ranks EP=2 one after another, each training the tiny experiment
   (ds_configs/experiments/tiny.json, every objective on, routing statistics on) on random tokens with
   random per-sequence domains. The per-rank micro-batch stays --batch (weak scaling, as in training).
   Prints global tokens/s, the speed-up over 1 rank and the peak memory of every rank (max RSS on CPU,
   torch.cuda.max_memory_allocated on GPU). On CPU each rank gets cores // ranks threads.

Model flags default to tiny.json's model (the head size and d_ff / d_model ratio are kept when --d-model
changes); the DeepSpeed config is ds_configs/ds_zero2_cpu.json on CPU, ds_zero2_gpu_bf16.json on GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ds_moe_div.composer import ObjectiveComposer
from ds_moe_div.config import BalanceConfig, ExperimentConfig, ModelConfig, ObjectivesConfig, load_experiment
from ds_moe_div.data.loader import IGNORE_INDEX
from ds_moe_div.distributed import (
    deepspeed_executable,
    divergence_group,
    init_distributed,
    seed_everything,
    set_cpu_threads,
)
from ds_moe_div.ds_config import check_ds_config, engine_config, load_ds_config
from ds_moe_div.fileio import free_port, write_json
from ds_moe_div.log_window import LogWindow
from ds_moe_div.metrics.accumulator import RoutingAccumulator
from ds_moe_div.model import Attention, MoELanguageModel, SwiGLU, rotary_tables
from ds_moe_div.train import train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ds_configs" / "experiments" / "tiny.json"
DS_CPU = ROOT / "ds_configs" / "ds_zero2_cpu.json"
DS_GPU = ROOT / "ds_configs" / "ds_zero2_gpu_bf16.json"
L_AUX_COEF = 0.01
SCALING_CONFIGS = ((1, 1), (2, 1), (2, 2))  # (ranks, ep_size)
SEED = 1234


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, help="default: tiny.json's")
    p.add_argument("--layers", type=int, help="default: tiny.json's")
    p.add_argument("--experts", type=int, help="default: tiny.json's")
    p.add_argument("--k", type=int, help="default: tiny.json's")
    p.add_argument("--seq", type=int, help="default: tiny.json's data.seq_len")
    p.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--vocab", type=int, help="default: tiny.json's tokenizer vocab_size")
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks (rounds over both steps in part 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed blocks (scaling)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per launcher run before it is killed")
    p.add_argument("--skip-plain", action="store_true", help="skip the comparison with plain DeepSpeed-MoE")
    p.add_argument("--skip-scaling", action="store_true", help="skip the 1 -> 2 rank launches")
    p.add_argument("--ranks-worker", "--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ep-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def experiment(args, *, ep_size: int = 1, all_objectives: bool = False) -> ExperimentConfig:
    """tiny.json with the size flags applied (head size and d_ff ratio kept when --d-model changes)."""
    base = load_experiment(TINY).model
    d = args.d_model or base.d_model
    overrides = [f"model.d_model={d}", f"model.n_heads={max(1, d // (base.d_model // base.n_heads))}",
                 f"model.d_ff={d * base.d_ff // base.d_model}", f"model.n_layers={args.layers or base.n_layers}",
                 f"model.moe.num_experts={args.experts or base.moe.num_experts}",
                 f"model.moe.k={args.k or base.moe.k}", f"model.moe.ep_size={ep_size}"]
    if args.seq:
        overrides.append(f"data.seq_len={args.seq}")
    if all_objectives:
        overrides.append("objectives.z_loss.coef=0.001")  # tiny.json leaves only z_loss off
    return load_experiment(TINY, overrides)


def vocab_size(args, cfg: ExperimentConfig) -> int:
    return args.vocab or cfg.model.vocab_size or cfg.data.tokenizer.vocab_size


def ds_config(args, cfg: ExperimentConfig, world_size: int, on_cpu: bool) -> dict:
    ds = load_ds_config(DS_CPU if on_cpu else DS_GPU)
    ds["train_micro_batch_size_per_gpu"] = args.batch
    micro, gas = check_ds_config(ds, cfg, world_size=world_size, on_cpu=on_cpu)
    return engine_config(ds, micro, gas, world_size, steps=cfg.train.steps)


def random_batches(args, cfg: ExperimentConfig, device, *, seed: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    seq = cfg.data.seq_len
    while True:
        ids = torch.randint(0, vocab, (args.batch, seq + 1), generator=g)
        dom = torch.randint(0, args.domains, (args.batch, 1), generator=g).expand(-1, seq)
        yield {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "domain_ids": dom.to(device)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _quiet():
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


# ---- 1. ds_moe_div baseline vs plain DeepSpeed-MoE ---------------------------------------------------------


class PlainBlock(nn.Module):
    """ds_moe_div's Block with stock `deepspeed.moe.layer.MoE` as the FFN: same parameter names, so the
    plain model loads our model's initial weights."""

    def __init__(self, cfg: ModelConfig, is_moe: bool) -> None:
        from deepspeed.moe.layer import MoE
        super().__init__()
        m = cfg.moe
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)
        if is_moe:
            self.ffn = MoE(cfg.d_model, self.ffn, num_experts=m.num_experts, ep_size=m.ep_size, k=m.k,
                           capacity_factor=m.capacity_factor, eval_capacity_factor=m.eval_capacity_factor,
                           min_capacity=m.min_capacity, use_residual=m.use_residual,
                           noisy_gate_policy=m.noisy_gate_policy, drop_tokens=m.drop_tokens, use_rts=m.use_rts,
                           top2_2nd_expert_sampling=m.top2_2nd_expert_sampling)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if isinstance(self.ffn, SwiGLU):
            return x + self.ffn(self.ffn_norm(x)), None
        out, l_aux, _ = self.ffn(self.ffn_norm(x))
        return x + out, l_aux


class PlainMoELM(nn.Module):
    """The decoder a DeepSpeed-MoE user would write: returns (lm_loss, mean l_aux over MoE layers)."""

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        moe_ids = set(cfg.moe_layer_ids())
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(PlainBlock(cfg, i in moe_ids) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids_BS, labels_BS):
        x = self.embed(input_ids_BS)
        l_aux = []
        for block in self.blocks:
            x, aux = block(x, self.rope_cos, self.rope_sin)
            if aux is not None:
                l_aux.append(aux)
        logits = self.lm_head(self.norm(x)).float()
        lm_loss = F.cross_entropy(logits.flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX)
        return lm_loss, torch.stack(l_aux).mean()


def plain_step(engine, batches) -> torch.Tensor:
    batch = next(batches)
    lm_loss, l_aux = engine(batch["input_ids"], batch["labels"])
    engine.backward(lm_loss + L_AUX_COEF * l_aux)
    engine.step()
    return lm_loss


def compare_with_plain(args, device) -> None:
    import deepspeed
    cfg = experiment(args)
    vocab = vocab_size(args, cfg)
    seed_everything(SEED)
    ours = MoELanguageModel(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len, seed=SEED)
    plain = PlainMoELM(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len)
    plain.load_state_dict(ours.state_dict())
    ds = ds_config(args, cfg, world_size=1, on_cpu=device.type == "cpu")
    engines = {}
    for name, model in (("ours", ours), ("plain", plain)):
        engines[name], *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    composer = ObjectiveComposer(ObjectivesConfig(balance=BalanceConfig(coef=L_AUX_COEF)), num_domains=args.domains)
    window = LogWindow()
    our_batches = random_batches(args, cfg, device, seed=0, vocab=vocab)
    plain_batches = random_batches(args, cfg, device, seed=0, vocab=vocab)  # the same batches as ours
    run = {"ours": lambda: train_step(engines["ours"], our_batches, composer, window, step=0),
           "plain": lambda: plain_step(engines["plain"], plain_batches)}
    times = {"ours": [], "plain": []}
    first_loss = {}
    for round_id in range(args.repeats + 1):  # round 0 warms both up
        for name in ("ours", "plain") if round_id % 2 == 0 else ("plain", "ours"):
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = run[name]()
                if name not in first_loss:  # once: a float() every step would add a host sync
                    first_loss[name] = float((window.last.lm if name == "ours" else loss).detach())
            _sync(device)
            if round_id:
                times[name].append((time.perf_counter() - start) / args.steps)
        window.reset()
    report_plain(args, cfg, device, times, first_loss)


def report_plain(args, cfg: ExperimentConfig, device, times: dict, first_loss: dict) -> None:
    tokens = args.batch * cfg.data.seq_len
    m = cfg.model
    print(f"\n== ds_moe_div baseline vs plain DeepSpeed-MoE ==\nmodel: d={m.d_model} layers={m.n_layers} "
          f"experts={m.moe.num_experts} k={m.moe.k}, {tokens} tokens/step, device={device}, "
          f"threads={torch.get_num_threads()}, {args.repeats} rounds x {args.steps} steps")
    print(f"first-step LM loss (same weights, same batch): ours {first_loss['ours']:.6f}, "
          f"plain {first_loss['plain']:.6f}\n")
    plain = statistics.median(times["plain"])
    print(f"{'step':34s} {'step ms':>9s} {'ratio':>7s} {'tokens/s':>9s}")
    for name, label in (("plain", "plain DeepSpeed-MoE (l_aux)"), ("ours", "ds_moe_div baseline (l_aux)")):
        med = statistics.median(times[name])
        print(f"{label:34s} {med * 1e3:9.1f} {med / plain:7.3f} {tokens / med:9.0f}")
    paired = sorted(o / p for o, p in zip(times["ours"], times["plain"]))
    print(f"\nds_moe_div baseline over plain: {statistics.median(times['ours']) / plain - 1:+.1%} "
          f"(per-round ratios: median {statistics.median(paired):.3f}, range {paired[0]:.3f}..{paired[-1]:.3f}; "
          f"target <= +3%)")


# ---- 2. scaling: the worker (one rank under the deepspeed launcher) ----------------------------------------


def ranks_worker(args) -> None:
    import deepspeed
    import torch.distributed as dist
    info = init_distributed()
    set_cpu_threads(info)
    on_cpu = not torch.cuda.is_available()
    device = torch.device("cpu") if on_cpu else torch.device("cuda", info.local_rank)
    cfg = experiment(args, ep_size=args.ep_size, all_objectives=True)
    vocab = vocab_size(args, cfg)
    seed_everything(SEED)
    model = MoELanguageModel(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len, seed=SEED,
                             ep_rank=info.ep_rank(args.ep_size))
    ds = ds_config(args, cfg, world_size=info.world_size, on_cpu=on_cpu)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    layers = model.moe_layers()
    names = [f"domain{i}" for i in range(args.domains)]
    routing = RoutingAccumulator(num_layers=len(layers), num_domains=args.domains, num_experts=cfg.model.moe.num_experts,
                                 k=cfg.model.moe.k, layer_ids=tuple(layer.layer_id for layer in layers))
    composer = ObjectiveComposer(cfg.objectives, num_domains=args.domains, world_group=dist.group.WORLD,
                                 divergence_group=divergence_group(cfg.objectives.divergence.scope, layers[0]))
    window = LogWindow(routing, names)
    batches = random_batches(args, cfg, device, seed=1000 + info.rank, vocab=vocab)
    steps_done = itertools.count()

    def one_step() -> None:  # as in training: the window is flushed every log_interval steps
        step = next(steps_done)
        train_step(engine, batches, composer, window, step=step)
        if (step + 1) % cfg.train.log_interval == 0:
            window.flush(world_size=info.world_size, lr=engine.get_lr()[0], grad_norm=engine.get_global_grad_norm())

    step_s = [timed_block(one_step, n, device) for n in [args.warmup] + [args.steps] * args.repeats]
    peak = peak_memory_mb(device)
    peaks = [None] * info.world_size
    dist.all_gather_object(peaks, peak)
    if info.is_main:
        step = statistics.median(step_s[1:])
        result = {"ranks": info.world_size, "ep_size": args.ep_size, "device": str(device.type),
                  "threads": torch.get_num_threads(), "step_s": step,
                  "tokens_per_s": info.world_size * args.batch * cfg.data.seq_len / step,
                  "memory": "cuda_max_allocated" if device.type == "cuda" else "max_rss", "peak_mb": peaks}
        write_json(args.out, result)


def timed_block(one_step, steps: int, device) -> float:
    """Seconds per step over `steps` calls of `one_step`."""
    import torch.distributed as dist
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    return (time.perf_counter() - start) / max(steps, 1)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- 2. scaling: the orchestrator --------------------------------------------------------------------------


def launch(args, ranks: int, ep_size: int, out: Path) -> tuple[int, str]:
    """One launcher run; on timeout its whole process group (launcher and ranks) is killed."""
    launcher = deepspeed_executable()
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("d_model", "layers", "experts", "k", "seq", "batch", "vocab", "domains", "steps",
                          "repeats", "warmup") and v is not None]
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--ranks-worker", f"--ep-size={ep_size}", f"--out={out}", *forwarded]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -signal.SIGKILL, f"timed out after {args.timeout} s\n{output}"
    return proc.returncode, output


def scaling(args) -> bool:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for ranks, ep_size in SCALING_CONFIGS:
            label = f"{ranks} rank{'s' if ranks > 1 else ''}, EP={ep_size}"
            if gpus is not None and ranks > gpus:
                rows.append((label, None, f"skipped: needs {ranks} GPUs, {gpus} here"))
                continue
            out = Path(tmp) / f"r{ranks}_ep{ep_size}.json"
            rc, output = launch(args, ranks, ep_size, out)
            if rc != 0 or not out.is_file():
                ok = False
                print(f"\n{label}: launcher failed (rc={rc}); last output:\n{output[-4000:]}", file=sys.stderr)
                rows.append((label, None, f"failed (rc={rc})"))
                continue
            rows.append((label, json.loads(out.read_text()), ""))
    report_scaling(args, rows)
    return ok


def report_scaling(args, rows) -> None:
    results = [r for _, r, _ in rows if r]
    memory = "peak GPU MB/rank" if results and results[0]["memory"] == "cuda_max_allocated" else "peak RSS MB/rank"
    print(f"\n== scaling 1 -> 2 ranks (tiny experiment, every objective on, micro-batch {args.batch} per rank, "
          f"{args.repeats} x {args.steps} timed steps) ==")
    print(f"{'config':18s} {'threads':>7s} {'step ms':>8s} {'tokens/s':>9s} {'speed-up':>8s} {'eff.':>6s}  {memory}")
    base = next((r["tokens_per_s"] for _, r, _ in rows if r and r["ranks"] == 1), None)
    for label, r, note in rows:
        if r is None:
            print(f"{label:18s} {note}")
            continue
        speedup = r["tokens_per_s"] / base if base else float("nan")
        print(f"{label:18s} {r['threads']:7d} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} {speedup:8.2f} "
              f"{speedup / r['ranks']:6.1%}  {' / '.join(f'{m:.0f}' for m in r['peak_mb'])}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if args.ranks_worker:
        _quiet()
        ranks_worker(args)
        return 0
    ok = True
    if not args.skip_scaling:  # first, while this process holds no engine, device memory or process group
        ok = scaling(args)
    if not args.skip_plain:
        _quiet()
        init_distributed()
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        compare_with_plain(args, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
