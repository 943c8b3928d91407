"""The GPU pilot: baseline vs L_ED (3-class, 0.01) x 3 seeds, run side by side on one GPU; results in
docs/results/gpu/. Run it through scripts/gpu_study.sh, which installs what is missing first.

    bash scripts/gpu_study.sh               # train + evaluate 6 runs, write docs/results/gpu/, print the table
    bash scripts/gpu_study.sh --dry-run     # print the plan and the commands; run and write nothing (CPU is fine)

The runs are those of ds_configs/sweeps/gpu_study.json (d_model 384, 6 layers, 16 experts top-2, seq 512,
micro-batch 64 on one rank, 400 steps = 13.1M tokens per run, bf16 ZeRO-2 from
ds_configs/ds_zero2_gpu_bf16_study.json, global-batch l_aux 1e-3, dropless on DeepSpeed's AutoEP layer (the
default MoE path), mixed packing), executed by the sweep runner with every run on its own single-rank launcher
(round-robin over the visible GPUs; all six on GPU 0 when there is one), each evaluated on the whole test
split. Sized to fit in ~9 minutes on one H100/H200 (not yet measured: no GPU was lent when it was
written); the time it took is written to summary.md.
Outputs: runs/sweeps/gpu_study/<variant>/seed<k>/ (run dirs) and docs/results/gpu/ (runs.csv, comparison.md,
effects.md/.csv, figures, summary.md). Without a GPU it refuses with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds_moe_div.sweep.config import load_sweep
from ds_moe_div.sweep.plan import Plan, build_plan

SWEEP = ROOT / "ds_configs" / "sweeps" / "gpu_study.json"
COPIED = ("runs.csv", "comparison.md", "comparison.csv", "effects.md", "effects.csv", "loss_curves.png",
          "delta_ppl_per_layer.png", "heatmaps.png")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run and write nothing")
    parser.add_argument("--corpus-dir", default="data/builtin", help="built-in corpus folder (built if missing)")
    parser.add_argument("--runs-dir", default="runs/sweeps/gpu_study", help="where the run dirs go")
    parser.add_argument("--out", default="docs/results/gpu", help="where the results are copied")
    return parser.parse_args(argv)


def plan_of(args) -> Plan:
    sweep = load_sweep(SWEEP)
    sweep = dataclasses.replace(sweep, output_dir=args.runs_dir,
                                base_overrides=(*sweep.base_overrides, f"data.corpus_dir={args.corpus_dir}"))
    return build_plan(sweep, SWEEP)


def tokens_per_run(plan: Plan) -> int:
    import json

    ds = json.loads(plan.deepspeed_config.read_text())
    run = plan.runs[0]
    micro = run.config.train.micro_batch_size or ds["train_micro_batch_size_per_gpu"]
    gas = run.config.train.gradient_accumulation_steps or ds.get("gradient_accumulation_steps", 1)
    return run.steps * micro * gas * plan.sweep.num_ranks * run.config.data.seq_len


def describe(plan: Plan) -> str:
    from ds_moe_div.sweep.launch import eval_command, train_command

    run, cfg = plan.runs[0], plan.runs[0].config
    moe = cfg.model.moe
    routing = "dropless (AutoEP)" if cfg.model.uses_autoep else f"capacity {moe.capacity_factor}"
    lines = [f"gpu_study: {len(plan.runs)} single-rank runs, side by side ({', '.join(r.key for r in plan.runs)})",
             (f"  model: d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, {moe.num_experts} experts top-{moe.k}, "
             f"{routing}, seq {cfg.data.seq_len}, {cfg.data.packing} packing"),
             (f"  balance: l_aux {cfg.objectives.balance.coef:g} ({cfg.objectives.balance.scope}); L_ED 3-class "
             f"{plan.sweep.variants['ed3_0.01'].overrides}"),
             f"  {run.steps} steps, {tokens_per_run(plan):,} tokens per run; DeepSpeed file {plan.deepspeed_config}",
             (f"  eval: {plan.eval.split} split, "
             f"{'whole split' if plan.eval.max_batches is None else f'{plan.eval.max_batches} batches'}, "
             f"{plan.eval.permutation_seeds} router permutation(s) per layer"),
             f"  run dirs: {plan.output_dir}; results: docs/results/gpu/",
             "  first run:",
             "    " + shlex.join(train_command(plan, run, Path(f"{run.run_dir}/sweep_ds_config.json"), resume=False,
                                               gpu="0", port="<free>")),
             "    " + shlex.join(eval_command(run, plan.eval))]
    return "\n".join(lines)


def ensure_corpus(corpus_dir: Path) -> None:
    if (corpus_dir / "corpus.jsonl.gz").is_file():
        return
    print(f"gpu_study: building the built-in corpus in {corpus_dir} (lite tier, 1 MB per subdomain)", flush=True)
    cmd = [sys.executable, "-m", "ds_moe_div", "prepare-corpus", "--out", str(corpus_dir), "--tier", "lite",
           "--mb-per-subdomain", "1"]
    if subprocess.run(cmd, check=False, cwd=ROOT).returncode != 0:
        raise SystemExit(f"gpu_study: could not build the corpus in {corpus_dir}; build it where the package "
                         "sources are reachable (python -m ds_moe_div prepare-corpus ...) and copy it here")


def slots(count: int) -> list[str]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    return [ids[i % len(ids)] for i in range(count)]


def summary_table(found, summaries) -> str:
    from ds_moe_div.evaluation.report import table

    lm = {(e.variant, e.reference): e for e in found if e.metric == "lm_loss"}
    rows = []
    for s in summaries:
        e = next((x for (v, _), x in lm.items() if v == s.variant), None)
        paired = ("" if e is None or e.reason else
                  f"{e.mean_diff:+.4f} [{e.ci_t_low:+.4f}, {e.ci_t_high:+.4f}], p {e.p_t:.3f}, MDE {e.mde:.3f}")
        rows.append([s.variant, str(len(s.seeds)), (f"{s.mean.get('lm_loss', float('nan')):.4f} ± "
                     f"{s.std.get('lm_loss', float('nan')):.3f}"), paired,
                     f"{s.mean.get('routing/mi/mean', float('nan')):.3f}",
                     f"{s.mean.get('routing/max_violation/mean', float('nan')):.3f}",
                     f"{100 * s.mean.get('routing/dropped_fraction/mean', float('nan')):.2f}%"])
    return table(["variant", "n", "test LM loss", "Δ vs baseline (95% t CI, paired t p, MDE)", "I(D;E)",
                  "MaxVio", "dropped"], rows)


def environment_text() -> str:
    import deepspeed
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return (f"{', '.join(gpus)}; torch {torch.__version__} (CUDA {torch.version.cuda}), DeepSpeed "
            f"{deepspeed.__version__}, Python {platform.python_version()}")


def run_study(args) -> int:
    from ds_moe_div.data import prepare_data
    from ds_moe_div.sweep.runner import execute

    os.chdir(ROOT)
    plan = plan_of(args)
    ensure_corpus(Path(args.corpus_dir))
    prepare_data(plan.runs[0].config.data)  # once, before six processes would each build the cache
    started = time.monotonic()
    outcomes = execute(plan, list(plan.runs), slots=slots(len(plan.runs)), on_cpu=False, progress=False)
    text = write_results(plan, outcomes, (time.monotonic() - started) / 60, Path(args.out))
    print(f"\n{text}\n\nresults in {args.out}/")
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"FAILED {o.run.key}: {o.message}", file=sys.stderr)
    return 1 if failed else 0


def write_results(plan: Plan, outcomes, minutes: float, out: Path) -> str:
    """Tables in the run dirs' folder, copied to `out` and rebuilt there from its runs.csv (so that effects.md
    names the command that regenerates it), summary.md; returns the summary table."""
    from ds_moe_div import fileio
    from ds_moe_div.sweep.aggregate import read_runs_csv, summarise
    from ds_moe_div.sweep.cli import write_comparison
    from ds_moe_div.sweep.effects import effects

    write_comparison(plan)
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (plan.output_dir / name).is_file():
            shutil.copyfile(plan.output_dir / name, out / name)
    write_comparison(plan, out / "runs.csv")
    results = read_runs_csv(out / "runs.csv", list(plan.runs), plan.eval, num_ranks=plan.sweep.num_ranks)
    summaries = summarise(results, variants=plan.variants, reference=plan.sweep.reference_variant)
    found, _ = effects(results, contrasts=plan.sweep.contrast_pairs(), endpoints=plan.sweep.endpoints)
    text = summary_table(found, summaries)
    per_run = "\n".join(f"- {o.run.key}: {'ok' if o.ok else 'FAILED'}, {o.seconds / 60:.1f} min ({o.message})"
                        for o in outcomes)
    fileio.write_text(out / "summary.md", (
        f"# GPU pilot\n\nCommand: `bash scripts/gpu_study.sh`\n\nMachine: {environment_text()}.\n"
        f"{len(plan.runs)} runs side by side, {tokens_per_run(plan):,} tokens each, {minutes:.1f} min wall "
        f"in all (training + evaluation).\n\n{text}\n\nRuns:\n{per_run}\n\nPaired statistics: "
        "[effects.md](effects.md); per-run metrics: [runs.csv](runs.csv).\n"))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print(describe(plan_of(args)))
        print("dry run: nothing was run or written")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_study: no CUDA GPU visible (torch.cuda.is_available() is false); this pilot needs one "
              "(--dry-run prints its plan)", file=sys.stderr)
        return 2
    return run_study(args)


if __name__ == "__main__":
    raise SystemExit(main())
