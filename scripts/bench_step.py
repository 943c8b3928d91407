"""Step-time overhead of each specialisation objective over the L_aux-only baseline, measured in one run.

    python scripts/bench_step.py [--d-model 256 --layers 4 --experts 8 --k 2 --batch 4 --seq 256 --repeats 6]

One model and one DeepSpeed engine (ds_configs/ds_zero2_cpu.json, fp32 / ds_zero2_gpu_bf16.json, bf16); the variants differ only in
the objective composer, and they are timed round-robin (baseline, +z, +ED, +orth, +var, all; again) so
that drift of the machine hits every variant alike. Prints the median step time of each, its ratio to
the baseline, tokens/s, and model FLOPs/s against this machine's measured fp32 matmul FLOPs/s. The
ratio is the median over rounds of (variant / baseline in the same round), printed with its range over
rounds: a variant whose range straddles 1.0 costs nothing measurable on this machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from pathlib import Path

import torch

from ds_moe_div.composer import ObjectiveComposer
from ds_moe_div.config import ModelConfig, MoEConfig, ObjectivesConfig, load_experiment
from ds_moe_div.distributed import init_distributed, seed_everything
from ds_moe_div.ds_config import engine_config, load_ds_config
from ds_moe_div.log_window import LogWindow
from ds_moe_div.metrics.accumulator import RoutingAccumulator
from ds_moe_div.model import MoELanguageModel
from ds_moe_div.train import train_step

ROOT = Path(__file__).resolve().parents[1]
DS_CPU = ROOT / "ds_configs" / "ds_zero2_cpu.json"
DS_GPU = ROOT / "ds_configs" / "ds_zero2_gpu_bf16.json"
VARIANTS = {
    "baseline (l_aux)": [],
    "+z_loss": ["z_loss.coef=0.001"],
    "+divergence": ["divergence.coef=0.01"],
    "+orthogonality": ["orthogonality.coef=0.01"],
    "+variance": ["variance.coef=0.01"],
    "all objectives": ["z_loss.coef=0.001", "divergence.coef=0.01", "orthogonality.coef=0.01", "variance.coef=0.01"],
}
ALL = VARIANTS["all objectives"]
# The same objectives with the routing statistics of the training window on (accumulated every
# micro-step, reduced and turned into scalars once per timed block: at most every --steps steps,
# more often than the default log_interval, so the measured overhead is an upper bound).
ROUTING_VARIANT = "all + routing stats"
# The orthogonality paper's training-time metrics (MaxVio_global per step, routing variance, co-selection;
# Expert Overlap also collects the experts' outputs) over the L_aux baseline's routing statistics.
PAPER_VARIANTS = {  # name: (paper metrics, expert_overlap)
    "aux + routing": (False, False),
    "aux + routing + paper": (True, False),
    "aux + routing + paper + overlap": (True, True),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds over all variants")
    p.add_argument("--paper-only", action="store_true",
                   help="only the paper metrics' isolated costs (against the best of 3 L_aux steps)")
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def objectives_for(overrides) -> ObjectivesConfig:
    return load_experiment(None, ["objectives." + o for o in overrides]).objectives


def random_batches(args, device):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        dom = torch.randint(0, args.domains, (args.batch, 1), generator=g).expand(-1, args.seq)
        yield {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "domain_ids": dom.to(device)}


def matmul_flops(device, n=1024, reps=20) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_flops_per_token(model, cfg: ModelConfig, seq: int) -> float:
    """6 x active parameters (each token runs k of E experts) + causal attention scores, fwd+bwd."""
    expert_params = sum(p.numel() for n, p in model.named_parameters() if "deepspeed_experts" in n)
    active = sum(p.numel() for p in model.parameters()) - expert_params * (1 - cfg.moe.k / cfg.moe.num_experts)
    return 6 * active + 6 * cfg.n_layers * cfg.d_model * seq


def main():
    args = parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    info = init_distributed()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=max(1, args.d_model // 64),
                      d_ff=2 * args.d_model, moe=MoEConfig(num_experts=args.experts, k=args.k))
    seed_everything(0)
    model = MoELanguageModel(cfg, vocab_size=args.vocab, seq_len=args.seq, seed=0)
    # The shipped DeepSpeed files, with this benchmark's batch size (the schedule never ends within it).
    ds = engine_config(load_ds_config(DS_GPU if device.type == "cuda" else DS_CPU), args.batch, 1, info.world_size,
                       steps=10**6)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    batches = random_batches(args, device)
    composers = {name: ObjectiveComposer(objectives_for(o), num_domains=args.domains) for name, o in VARIANTS.items()}
    composers[ROUTING_VARIANT] = ObjectiveComposer(objectives_for(ALL), num_domains=args.domains)
    layer_ids = tuple(m.layer_id for m in model.moe_layers())
    routing = RoutingAccumulator(num_layers=len(layer_ids), num_domains=args.domains, num_experts=args.experts,
                                 k=args.k, layer_ids=layer_ids, paper_metrics=False)
    accumulators = {ROUTING_VARIANT: (routing, False)}
    for name, (paper_on, overlap) in PAPER_VARIANTS.items():
        composers[name] = ObjectiveComposer(objectives_for([]), num_domains=args.domains)
        accumulators[name] = (RoutingAccumulator(num_layers=len(layer_ids), num_domains=args.domains,
                                                 num_experts=args.experts, k=args.k, layer_ids=layer_ids,
                                                 window_steps=args.steps, paper_metrics=paper_on), overlap)
    names = [f"domain{i}" for i in range(args.domains)]
    if args.paper_only:
        window = LogWindow(accumulators["aux + routing"][0], names)
        step = _best_of(lambda: train_step(engine, batches, composers["aux + routing"], window, step=0), 3, device)
        return paper_cost(args, engine, batches, layer_ids, names, device, step)
    times = {name: [] for name in composers}
    for round_id in range(args.repeats + 1):  # round 0 warms up every variant
        for name, composer in composers.items():
            acc, overlap = accumulators.get(name, (None, False))
            window = LogWindow(acc, names, expert_overlap=overlap)
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(engine, batches, composer, window, step=0)
            if window.routing is not None:
                window.routing.reduce().scalars(names)
            _sync(device)
            if round_id:
                times[name].append((time.perf_counter() - start) / args.steps)
    report(args, cfg, model, times, matmul_flops(device), device)
    paper_cost(args, engine, batches, layer_ids, names, device, min(times["aux + routing"]))


def report(args, cfg, model, times, peak, device):
    tokens = args.batch * args.seq
    per_token = model_flops_per_token(model, cfg, args.seq)
    base = statistics.median(times["baseline (l_aux)"])
    print(f"\nmodel: d={args.d_model} layers={args.layers} experts={args.experts} k={args.k}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {tokens} tokens/step, device={device}, "
          f"threads={torch.get_num_threads()}")
    print(f"measured fp32 matmul: {peak / 1e9:.1f} GFLOP/s\n")
    print(f"{'variant':22s} {'step ms':>9s} {'ratio':>7s} {'range':>13s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'MFU':>6s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        flops = per_token * tokens / med
        ratio, low, high = paired_ratio(ts, times["baseline (l_aux)"])
        print(f"{name:22s} {med * 1e3:9.1f} {ratio:7.3f} {low:6.3f}-{high:6.3f} {tokens / med:9.0f} "
              f"{flops / 1e9:8.1f} {flops / peak:6.1%}")
    allobj = paired_ratio(times["all objectives"], times["baseline (l_aux)"])[0]
    routing = paired_ratio(times[ROUTING_VARIANT], times["all objectives"])[0]
    print(f"\nall objectives together add {allobj - 1:+.1%} step time over the baseline (target <= +5%); "
          f"median step times: {base * 1e3:.1f} -> {statistics.median(times['all objectives']) * 1e3:.1f} ms")
    print(f"routing statistics add {routing - 1:+.1%} over all objectives (target < 2%)")
    plain = times["aux + routing"]
    for name in ("aux + routing + paper", "aux + routing + paper + overlap"):
        ratio, low, high = paired_ratio(times[name], plain)
        print(f"{name[len('aux + routing + '):]} metrics: step time ratio {ratio:.4f} (range {low:.4f}-{high:.4f}) "
              f"over the L_aux baseline with routing statistics (target <= 1.02)")


def _best_of(fn, repeats: int, device) -> float:
    """Smallest wall time of `repeats` calls: the cost of the work itself, without the machine's load."""
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def paper_cost(args, engine, batches, layer_ids, names, device, step_time: float, repeats: int = 30) -> None:
    """The paper metrics' own work per optimizer step, timed in isolation (best of `repeats`): one window of
    --steps steps of accumulator adds (+ end_step) and its one reduce, with the counters on vs off, on the
    records of a real forward pass; relative to the best measured step time of the L_aux baseline with
    routing statistics. On a loaded machine this is the reliable number; the paired step ratios above
    also carry the load's noise."""
    batch = next(batches)
    with torch.no_grad():
        out = engine(batch["input_ids"], labels_BS=batch["labels"], collect_expert_outputs=True)
    plain_records = [dataclasses.replace(r, expert_outputs_TKM=None) for r in out.routing]
    costs = {}
    for name, paper_on, records in (("off", False, plain_records), ("paper", True, plain_records),
                                    ("paper + overlap", True, list(out.routing))):
        acc = RoutingAccumulator(num_layers=len(layer_ids), num_domains=args.domains, num_experts=args.experts,
                                 k=args.k, layer_ids=layer_ids, window_steps=args.steps, paper_metrics=paper_on)

        def window(acc=acc, records=records):
            acc.reset()
            for _ in range(args.steps):
                acc.add(records, batch["domain_ids"])
                acc.end_step()
            acc.reduce().scalars(names)
        costs[name] = _best_of(window, repeats, device) / args.steps
    print(f"\npaper metrics' own cost per optimizer step (best of {repeats}, window of {args.steps} steps incl. its "
          f"reduce), against the best L_aux + routing step ({step_time * 1e3:.1f} ms):")
    for name in ("paper", "paper + overlap"):
        extra = costs[name] - costs["off"]
        print(f"  {name:16s} +{extra * 1e3:.3f} ms/step = {extra / step_time:+.3%} (target <= +2%; routing stats "
              f"alone {costs['off'] * 1e3:.3f} ms)")
    # Expert Overlap also makes the model hand out its experts' outputs (another combine path): forward +
    # backward of the bare module, best of a few, with and without.
    model = engine.module

    def fwd_bwd(collect: bool):
        model.zero_grad(set_to_none=True)
        model(batch["input_ids"], labels_BS=batch["labels"], collect_expert_outputs=collect).lm_loss.backward()
    plain, collected = math.inf, math.inf
    for _ in range(max(3, repeats // 2)):  # interleaved, so that the machine's load hits both alike
        plain = min(plain, _best_of(lambda: fwd_bwd(False), 1, device))
        collected = min(collected, _best_of(lambda: fwd_bwd(True), 1, device))
    print(f"  collecting expert outputs: forward+backward {plain * 1e3:.1f} -> {collected * 1e3:.1f} ms "
          f"({collected / plain - 1:+.2%})")


def paired_ratio(times: list[float], reference: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over rounds of times[r] / reference[r]: both timed in the same round."""
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


if __name__ == "__main__":
    main()
