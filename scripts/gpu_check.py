"""One-command check of the GPU path (run through scripts/gpu_check.sh, which installs what it needs).

    bash scripts/gpu_check.sh [--dry-run] [--out docs/results/gpu_check] [--work-dir /tmp/gpu_check]

Stages, each a subprocess with its own time limit (together < 5 minutes on one H100/H200):
  1. e2e:        the trainer through the deepspeed launcher on every GPU, bf16 ZeRO-2
                 (ds_configs/ds_zero2_gpu_bf16.json, the smoke experiment): 20 steps with checkpoints,
                 then --resume to 30 steps; both exit 0 and leave a complete checkpoint.
  2. parity:     bf16 and fp32 ZeRO-2 gradients against the fp32 reference with modules used twice in one
                 step (DeepSpeed #8224; ds_moe_div/bf16_parity.py, tolerances of tests/test_bf16_parity.py)
                 on min(2, GPUs) ranks.
  3. throughput: tokens/s, MFU against the GPU's dense bf16 peak (PEAK_BF16_TFLOPS, by device name) and
                 peak memory, for the default model and a larger one (CONFIGS), one GPU.
Results: <out>/results.json and <out>/summary.md (printed too). On a machine without CUDA it refuses in
one line (exit 3); --dry-run prints the plan anywhere and runs nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ds_moe_div import fileio  # (after the path: the script runs from any directory)

DS_GPU = ROOT / "ds_configs" / "ds_zero2_gpu_bf16.json"
SMOKE = ROOT / "ds_configs" / "experiments" / "smoke.json"
NO_GPU_EXIT_CODE = 3
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name(); the
# first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))
CONFIGS = {  # model dims, micro batch, sequence length of the throughput stage
    "default": {"model": {}, "batch": 16, "seq": 256, "vocab": 4096},
    "larger": {"model": {"d_model": 1024, "n_layers": 8, "n_heads": 16, "d_ff": 4096}, "batch": 8, "seq": 1024,
               "vocab": 32768},
}
PARITY_SEED = 3
PARITY_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-2}
# The first e2e run JIT-compiles DeepSpeed's FusedAdam (nvcc, ~1-2 min); later stages reuse it.
TIMEOUTS = {"e2e": 240, "e2e-resume": 90, "parity": 120, "throughput": 150}


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def deepspeed_cmd(num_gpus: int, *args: str) -> list[str]:
    return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(num_gpus), "--master_port",
            str(fileio.free_port()), *args]


def plan(num_gpus: int, out: Path, work: Path) -> list[tuple[str, list[str]]]:
    run_dir = work / "e2e_run"
    train = [str(ROOT / "scripts" / "train.py"), "--deepspeed_config", str(DS_GPU), "--config", str(SMOKE),
             "--override", f"train.run_dir={run_dir}", "--override", "train.save_interval=10",
             "--override", "train.eval_interval=10", "--override", "train.log_interval=5"]
    me = str(Path(__file__).resolve())
    return [
        ("e2e", deepspeed_cmd(num_gpus, *train, "--override", "train.steps=20")),
        ("e2e-resume", deepspeed_cmd(num_gpus, *train, "--override", "train.steps=30", "--resume")),
        ("parity", deepspeed_cmd(min(2, num_gpus), me, "--worker", "parity", "--out", str(work / "parity.json"))),
        ("throughput", deepspeed_cmd(1, me, "--worker", "throughput", "--out", str(work / "throughput.json"))),
    ]


# ---- workers (run under the deepspeed launcher) ----------------------------------------------------------------


def parity_worker(out: Path) -> None:
    from ds_moe_div import bf16_parity
    from ds_moe_div.distributed import init_distributed

    info = init_distributed()
    ref = bf16_parity.reference_grads(PARITY_SEED, info.world_size)
    result = {"world_size": info.world_size}
    for precision, tolerance in PARITY_TOLERANCE.items():
        grads = bf16_parity.zero2_grads(info.rank, info.world_size, seed=PARITY_SEED, bf16=precision == "bf16")
        errors = bf16_parity.relative_errors(grads, ref)
        result[precision] = {"max_relative_error": max(errors.values()), "errors": errors, "tolerance": tolerance,
                             "ok": max(errors.values()) < tolerance}
    result["lost_use_error_min"] = min(bf16_parity.dropped_use_error(PARITY_SEED, info.world_size).values())
    if info.is_main:
        fileio.write_json(out, result)


def _random_batches(batch: int, seq: int, vocab: int, domains: int = 3):
    import torch

    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        dom = torch.randint(0, domains, (batch, 1), generator=g).expand(-1, seq)
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "domain_ids": dom.contiguous()}


def throughput_worker(out: Path, *, configs: dict = CONFIGS, ds_path: Path = DS_GPU, steps: int = 10,
                      warmup: int = 3) -> None:
    """Time `steps` optimizer steps (after `warmup`) of each config on this rank's device (CUDA; the CPU
    works too, for tests: no memory figures, no MFU) and write the table to `out`."""
    import deepspeed
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_step import model_flops_per_token

    from ds_moe_div.composer import ObjectiveComposer
    from ds_moe_div.config import ModelConfig, load_experiment
    from ds_moe_div.distributed import init_distributed, seed_everything
    from ds_moe_div.ds_config import engine_config, load_ds_config
    from ds_moe_div.log_window import LogWindow
    from ds_moe_div.model import MoELanguageModel
    from ds_moe_div.train import train_step

    info = init_distributed()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", info.local_rank) if on_gpu else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = peak_tflops(name)

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    objectives = load_experiment(SMOKE).objectives  # every objective on, as in the smoke run
    results = {"device": name, "peak_bf16_tflops": peak, "configs": {}}
    for label, spec in configs.items():
        cfg = ModelConfig(**spec["model"])
        seed_everything(0)
        model = MoELanguageModel(cfg, vocab_size=spec["vocab"], seq_len=spec["seq"], seed=0)
        ds = engine_config(load_ds_config(ds_path), spec["batch"], 1, info.world_size, steps=10**6)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
        composer, window = ObjectiveComposer(objectives, num_domains=3), LogWindow()
        stream = _random_batches(spec["batch"], spec["seq"], spec["vocab"])
        for _ in range(warmup):
            train_step(engine, stream, composer, window, step=0)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(engine, stream, composer, window, step=0)
        sync()
        seconds = (time.perf_counter() - start) / steps
        tokens = spec["batch"] * spec["seq"]
        flops = model_flops_per_token(model, cfg, spec["seq"]) * tokens / seconds
        results["configs"][label] = {
            "model": spec["model"] or "ModelConfig defaults", "batch": spec["batch"], "seq": spec["seq"],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "step_ms": seconds * 1e3,
            "tokens_per_s": tokens / seconds, "model_tflops": flops / 1e12,
            "mfu": None if peak is None else flops / (peak * 1e12),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None}
        engine.destroy()
        del engine, model
        if on_gpu:
            torch.cuda.empty_cache()
    fileio.write_json(out, results)


# ---- driver ------------------------------------------------------------------------------------------------------


def run_stages(stages, work: Path) -> dict:
    results = {}
    for name, cmd in stages:
        started = time.time()
        log = work / f"{name}.log"
        env = dict(os.environ, DS_ACCELERATOR="cuda", PYTHONPATH=str(ROOT))
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=TIMEOUTS[name], start_new_session=True).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        results[name] = {"rc": rc, "seconds": round(time.time() - started, 1), "log": str(log)}
        print(f"  {name:11s} rc={rc} ({results[name]['seconds']} s, log {log})", flush=True)
    return results


def summarize(stages: dict, work: Path) -> tuple[dict, list[str], bool]:
    from ds_moe_div import rundir

    run_dir = work / "e2e_run"
    root = rundir.checkpoint_root(run_dir)
    stages["e2e"]["latest_complete"] = rundir.latest_tag(root) if rundir.complete_tags(root) else None
    ok = all(s["rc"] == 0 for s in stages.values()) and stages["e2e"]["latest_complete"] == "global_step30"
    parity = json.loads((work / "parity.json").read_text()) if (work / "parity.json").is_file() else None
    throughput = json.loads((work / "throughput.json").read_text()) if (work / "throughput.json").is_file() else None
    lines = ["# GPU check", "", "stages: " + ", ".join(f"{k} rc={v['rc']} ({v['seconds']} s)" for k, v in stages.items()),
             f"e2e: latest complete checkpoint {stages['e2e']['latest_complete']} (want global_step30)", ""]
    if parity:
        ok = ok and parity["fp32"]["ok"] and parity["bf16"]["ok"]
        lines += [(f"gradient parity on {parity['world_size']} rank(s) (modules used twice, DeepSpeed #8224): "
                   f"fp32 max rel. error {parity['fp32']['max_relative_error']:.2e} (< {PARITY_TOLERANCE['fp32']}), "
                   f"bf16 {parity['bf16']['max_relative_error']:.2e} (< {PARITY_TOLERANCE['bf16']}); a lost use "
                   f"would be >= {parity['lost_use_error_min']:.2f}"), ""]
    if throughput:
        peak = throughput["peak_bf16_tflops"]
        lines += [f"throughput on {throughput['device']} (dense bf16 peak {peak or 'unknown'} TFLOP/s):", "",
                  "| config | params (M) | batch x seq | step ms | tokens/s | model TFLOP/s | MFU | peak memory GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, r in throughput["configs"].items():
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            lines.append(f"| {label} | {r['params_m']:.1f} | {r['batch']} x {r['seq']} | {r['step_ms']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.1f} | {mfu} | {memory} |")
    lines += ["", f"overall: {'PASS' if ok else 'FAIL'}"]
    return {"stages": stages, "parity": parity, "throughput": throughput, "ok": ok}, lines, ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu_check")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/gpu_check"), help="run dir and logs (not kept)")
    p.add_argument("--worker", choices=("parity", "throughput"), help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        {"parity": parity_worker, "throughput": throughput_worker}[args.worker](args.out)
        return 0
    try:
        import torch
        num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # the plan needs no torch; the check installs one (gpu_check.sh)
        num_gpus = 0
    if args.dry_run:
        shown = num_gpus or 1
        print(f"gpu_check plan ({num_gpus} CUDA GPU(s) here; shown for {shown}); results -> {args.out}")
        for name, cmd in plan(shown, args.out, args.work_dir):
            print(f"  {name:11s} (limit {TIMEOUTS[name]} s): {' '.join(cmd)}")
        print(f"  then: {args.out}/results.json and {args.out}/summary.md; MFU peaks (dense bf16 TFLOP/s): "
              + ", ".join(f"{k} {v:g}" for k, v in PEAK_BF16_TFLOPS))
        return 0
    if num_gpus == 0:
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check; "
              "run it on a GPU machine, or pass --dry-run for the plan", file=sys.stderr)
        return NO_GPU_EXIT_CODE
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    print(f"gpu_check on {num_gpus} x {torch.cuda.get_device_name(0)}:", flush=True)
    stages = run_stages(plan(num_gpus, args.out, args.work_dir), args.work_dir)
    result, lines, ok = summarize(stages, args.work_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    fileio.write_json(args.out / "results.json", result)
    fileio.write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
