"""`python -m ds_moe_div eval`: evaluate one checkpoint on held-out text, on 1 or N ranks.

    python -m ds_moe_div eval --run-dir runs/tiny [--checkpoint global_step200] [--split test]
        [--max-batches 32|all] [--permutation-seeds 3] [--domain-column group] [--as-trained-labels]
        [--micro-batch-size 8] [--out DIR] [--tensorboard]
        [--tasks cloze,humaneval,arc_easy] [--ablation auto|on|off]   (see evaluation/tasks.py)
    deepspeed --num_gpus 2 scripts/evaluate.py --run-dir runs/tiny ...

One pass over the held-out batches gives the loss per domain and the routing statistics together; the
router-permutation delta-PPL adds (MoE layers + 1) x seeds passes over the same batches. Writes
report.json, report.md and figures/ to --out (default <run>/eval/<tag>, suffixed -<split> and
-by-<column> when those differ from test and the run's own labels); --tensorboard also logs them to
<out>/tensorboard at the checkpoint's step (`tensorboard --logdir <run>` shows them beside training).

A run trained with shuffled labels (data.shuffle_labels_seed, the negative control) is evaluated against
the TRUE labels of its domain_column: the same held-out sequences, each token labelled with its own
document's class (see relabel.py), so per-domain PPL and the routing metrics are comparable with the
other runs; the overall LM loss does not depend on labels. report.json "labels" says which labels were
used; --as-trained-labels uses the shuffled ones instead (output suffixed -as-trained).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from itertools import islice
from pathlib import Path

import torch

from ds_moe_div import progress, rundir
from ds_moe_div.checkpoint import CheckpointError, tokenizer_digest
from ds_moe_div.cli import prog
from ds_moe_div.config_loader import ConfigError
from ds_moe_div.config_paths import parse_overrides
from ds_moe_div.data import BatchLoader, DataError
from ds_moe_div.evaluation import stratify, training_curves
from ds_moe_div.evaluation import tasks as eval_tasks
from ds_moe_div.evaluation.heldout import heldout_sums, summarize
from ds_moe_div.evaluation.loading import LoadedCheckpoint, load_for_eval, working_dir
from ds_moe_div.evaluation.permutation import (
    draw_permutations,
    router_permutation_delta,
)
from ds_moe_div.evaluation.relabel import relabelled_split
from ds_moe_div.evaluation.report import plain, write_report
from ds_moe_div.evaluation.specialisation import specialisation_pass
from ds_moe_div.metrics.accumulator import RoutingAccumulator


def _max_batches(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1, or 'all' for the whole split")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog("eval"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="the run directory (its latest checkpoint unless --checkpoint)")
    parser.add_argument("--checkpoint", help="a tag of the run (global_step200) or a checkpoint path")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--max-batches", type=_max_batches, default=32, metavar="N|all",
                        help="global batches per pass (default 32; 'all' = the whole split)")
    parser.add_argument("--permutation-seeds", type=int, default=3, metavar="N",
                        help="router permutations per layer for delta-PPL (seeds 0..N-1; 0 skips it)")
    parser.add_argument("--domain-column", help="label the held-out tokens with another column of the corpus "
                        "(e.g. group, subdomain); the held-out documents stay the run's own")
    parser.add_argument("--as-trained-labels", action="store_true",
                        help="a run trained with data.shuffle_labels_seed: use its shuffled labels, not the "
                        "true ones (the default)")
    parser.add_argument("--micro-batch-size", type=int, help="per rank (default: the run's training micro batch)")
    parser.add_argument("--out", help="output directory (default <run>/eval/<tag>[-<split>][-by-<column>])")
    parser.add_argument("--tensorboard", action="store_true", help="also log to <out>/tensorboard")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=PATH",
                        help="point the run at data that moved, e.g. data.corpus_dir=/data/builtin (repeatable; "
                        "data.corpus, data.corpus_dir, data.label_map, data.tokenizer.path, data.cache_dir)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    eval_tasks.add_arguments(parser)
    args = parser.parse_args(argv)
    if not (args.run_dir or args.checkpoint):
        parser.error("give --run-dir (and optionally --checkpoint TAG) or --checkpoint PATH")
    if args.permutation_seeds < 0:
        parser.error("--permutation-seeds must be >= 0")
    return args


def checkpoint_path(args) -> Path:
    if args.checkpoint is None:
        return Path(args.run_dir)
    tag_dir = rundir.tag_dir(args.run_dir or ".", args.checkpoint)
    return tag_dir if args.run_dir and tag_dir.is_dir() else Path(args.checkpoint)


def labels_used(cfg_data, column: str, as_trained: bool) -> str:
    """report.json "labels": which labels the held-out tokens carry."""
    seed = cfg_data.shuffle_labels_seed
    if seed is None:
        return "true"
    if as_trained and column == cfg_data.domain_column:
        return f"as trained: shuffled (seed {seed})"
    return f"true (run trained with shuffled labels, seed {seed})"


def _held_out(loaded: LoadedCheckpoint, split: str, column: str | None, as_trained: bool = False):
    """(packed split, domain names, label column, labels_used) of the evaluation."""
    cfg = loaded.cfg.data
    own = cfg.domain_column
    column = column or own
    if as_trained and column != own:
        raise ValueError(f"--as-trained-labels applies to the run's own domain_column {own!r}; "
                         f"--domain-column {column!r} always gives the true labels of that column")
    labels = labels_used(cfg, column, as_trained)
    if column == own and (cfg.shuffle_labels_seed is None or as_trained):
        return loaded.data.splits[split], loaded.data.domain_names, own, labels
    with working_dir(loaded.launch_dir):
        packed, names = relabelled_split(cfg, loaded.data, split, column=column)
    return packed, names, column, labels


def default_out(loaded: LoadedCheckpoint, split: str, column: str, *, as_trained: bool = False) -> Path:
    name = loaded.tag_dir.name + ("" if split == "test" else f"-{split}")
    name += "" if column == loaded.cfg.data.domain_column else f"-by-{column}"
    name += "-as-trained" if as_trained and loaded.cfg.data.shuffle_labels_seed is not None else ""
    return rundir.eval_dir(loaded.run_dir, name)


def evaluate(args) -> dict:
    """Collective: every rank runs it; rank 0 writes the report. Returns the report (every rank)."""
    started = time.perf_counter()
    show = not args.no_progress
    loaded = load_for_eval(checkpoint_path(args), micro_batch_size=args.micro_batch_size, show_progress=show,
                           path_overrides=parse_overrides(getattr(args, "override", ())))
    info, engine, moe = loaded.info, loaded.engine, loaded.cfg.model.moe
    as_trained = args.as_trained_labels
    split, names, column, labels = _held_out(loaded, args.split, args.domain_column, as_trained)
    eval_tasks.check_tasks(args, info.world_size)
    # With a batch budget, every class gets held-out rows first (stratify.py); the whole split otherwise.
    # The tasks (cloze) draw from the whole split, not the rows chosen for the batch budget.
    task_split = split
    split, class_rows = stratify.select(split, max_batches=args.max_batches,
                                        global_batch=loaded.micro_batch_size * info.world_size)
    loader = BatchLoader(split, micro_batch_size=loaded.micro_batch_size, rank=info.rank,
                         world_size=info.world_size, shuffle=False, loop=False)
    steps = len(loader) if args.max_batches is None else min(args.max_batches, len(loader))
    layers = loaded.model.moe_layers()
    layer_ids = [layer.layer_id for layer in layers]
    seeds = list(range(args.permutation_seeds))
    num_experts, k = getattr(loaded.model, "num_experts", moe.num_experts), getattr(loaded.model, "k", moe.k)
    passes = 2 + (len(layers) + 1) * len(seeds) + eval_tasks.ablation_passes(args, len(names), k, num_experts)
    # (+1: the specialisation pass, Expert Overlap and Silhouette)
    bar = progress.bar(total=passes * steps, desc="eval", unit="batch", enabled=info.is_main and show,
                       log_every=max(steps, 1))  # off a terminal: one line per pass

    def run_pass(accumulator=None):
        batches = _counted(islice(loader, steps), bar)
        return summarize(heldout_sums(engine, batches, num_domains=len(names), accumulator=accumulator), names)

    acc = RoutingAccumulator(num_layers=len(layers), num_domains=len(names), num_experts=num_experts, k=k,
                             layer_ids=layer_ids, device=engine.device)
    base = run_pass(acc)
    stats = acc.reduce()
    warning = stratify.missing_classes_warning({n: d.tokens for n, d in base.per_domain.items()},
                                               split_counts=class_rows, max_batches=args.max_batches, split=args.split)
    if warning and info.is_main:
        print(warning, file=sys.stderr)
    paper_scalars, silhouette = specialisation_pass(engine, layers, _counted(islice(loader, steps), bar))
    perms = draw_permutations(len(layers), num_experts, seeds)
    delta = router_permutation_delta(run_pass, layers, layer_ids, base, perms, progress=bar.set_postfix_str) \
        if seeds else {}
    ablation = eval_tasks.run_ablation(args, run_pass, layers, layer_ids, stats, base, k=k,
                                       num_experts=num_experts, progress=bar.set_postfix_str)
    bar.close()
    task_results = eval_tasks.run_tasks(args, loaded, task_split, names)
    out_dir = Path(args.out) if args.out else default_out(loaded, args.split, column, as_trained=as_trained)
    report = {
        "checkpoint": str(loaded.tag_dir), "run_dir": str(loaded.run_dir), "tag": loaded.tag_dir.name,
        "step": loaded.step, "split": args.split, "domain_column": column, "labels": labels,
        "domain_names": list(names),
        "tokens": base.tokens, "lm_loss": base.lm_loss, "ppl": base.ppl,
        "held_out_sha256": held_out_digest(split, steps * loader.global_batch, loaded.data.tokenizer_path),
        "per_domain": {name: d.to_dict() for name, d in base.per_domain.items()}, "delta_ppl": delta,
        "permutations": {"kind": "derangement", "seeds": seeds,
                         **{f"layer_{lid}": [p[i].tolist() for p in perms] for i, lid in enumerate(layer_ids)}},
        "routing": {**stats.scalars(names), **paper_scalars}, "silhouette": silhouette,
        "routing_matrices": _matrices(stats), "figures": [], "ablation": ablation, "tasks": task_results,
        "eval": {**_settings(loaded, args, steps=steps, passes=passes, seconds=time.perf_counter() - started,
                             out_dir=out_dir), "split_global_batches": len(loader)},  # the whole split's size
        "config": loaded.saved_config, "warnings": [warning] if warning else [],
    }
    if info.is_main:
        _write_outputs(report, stats, out_dir, tensorboard=args.tensorboard)
    return plain(report)


def held_out_digest(split, rows: int, tokenizer: Path) -> str:
    """sha256 of the tokenizer and the token rows an evaluation scored (the loader reads them in order):
    two reports with one digest measured their losses on exactly the same tokens."""
    digest = hashlib.sha256(tokenizer_digest(tokenizer).encode())
    digest.update(split.tokens_NS1[:rows].tobytes(order="C"))
    return digest.hexdigest()


def _settings(loaded: LoadedCheckpoint, args, *, steps: int, passes: int, seconds: float, out_dir: Path) -> dict:
    """How the numbers were measured (they depend on the micro batch through the eval capacity)."""
    moe = loaded.cfg.model.moe
    return {"max_batches": args.max_batches, "global_batches": steps, "micro_batch_size": loaded.micro_batch_size,
            "world_size": loaded.info.world_size, "ep_size": moe.ep_size, "dtype": loaded.dtype,
            "eval_capacity_factor": moe.eval_capacity_factor, "passes": passes, "seconds": round(seconds, 2),
            "data_cache": str(loaded.data.cache_path), "out_dir": str(out_dir)}


def _counted(batches, bar):
    for batch in batches:
        yield batch
        bar.update(1)


def _matrices(stats) -> dict:
    matrices = stats.matrices()
    return {f"layer_{lid}": {kind: plain(matrices[f"routing/{kind}/layer_{lid}"])
                             for kind in ("frequency", "mean_prob", "load", "kept_load")}
            for lid in stats.layer_ids}


def _write_outputs(report: dict, stats, out_dir: Path, *, tensorboard: bool) -> None:
    from ds_moe_div.evaluation import plots
    from ds_moe_div.monitor import Monitor

    names = report["domain_names"]
    figures = plots.routing_figures(stats, names)
    if report["delta_ppl"]:
        figures["delta_ppl"] = plots.delta_ppl_figure(report["delta_ppl"], names)
    if report.get("ablation", {}).get("masked") or report.get("ablation", {}).get("keep_k"):
        figures["expert_ablation"] = plots.ablation_figure(report["ablation"], report["ablation"]["keep_k"], names)
    report["figures"] = plots.save_figures(figures, out_dir) + training_curves.write_run_figure(report["run_dir"],
                                                                                                out_dir)
    write_report(report, out_dir)
    if tensorboard:
        monitor = Monitor(rundir.tensorboard_dir(out_dir), enabled=True)
        tb_figures = {f"eval/{report['split']}_delta_ppl" if name == "delta_ppl" else
                      f"routing/{name.replace('heatmap_', 'heatmap/')}": fig for name, fig in figures.items()}
        plots.log_to_tensorboard(monitor, tb_figures, tensorboard_scalars(report), step=report["step"])
        monitor.close()


def tensorboard_scalars(report: dict) -> dict[str, float]:
    """Tags as in training (`eval/<split>_lm_loss[/<domain>]`, `routing/...`) so both overlay."""
    prefix, out = f"eval/{report['split']}", dict(report["routing"])
    out[f"{prefix}_lm_loss"], out[f"{prefix}_ppl"] = report["lm_loss"], report["ppl"]
    for name, d in report["per_domain"].items():
        out[f"{prefix}_lm_loss/{name}"], out[f"{prefix}_ppl/{name}"] = d["lm_loss"], d["ppl"]
    from ds_moe_div.evaluation.task_report import flat_metrics
    out.update({f"{prefix}_{key}": value for key, value in flat_metrics(report).items()})  # tasks/..., ablation/...
    for key, entry in report["delta_ppl"].items():
        out[f"{prefix}_delta_ppl/{key}"] = entry["mean"]
        for name, d in entry["per_domain"].items():
            out[f"{prefix}_delta_ppl/{key}/{name}"] = d["mean"]
    return {tag: value for tag, value in out.items() if value is not None}


def main(argv=None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except (CheckpointError, ConfigError, DataError, ValueError, ImportError) as e:
        print(f"ds_moe_div eval: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_text(report))
    return 0


def summary_text(report: dict) -> str:
    from ds_moe_div.evaluation.report import fmt
    head = (f"{report['tag']} on {report['split']} ({report['tokens']:,} target tokens): "
            f"lm_loss {fmt(report['lm_loss'])}, PPL {fmt(report['ppl'], 2)}")
    lines = [head]
    if report.get("labels", "true") != "true":
        lines.append(f"  labels: {report['labels']}")
    lines += [f"  delta-PPL {key}: {fmt(entry['mean'], 3)} ± {fmt(entry['std'], 3)}"
              for key, entry in report["delta_ppl"].items()]
    lines.append(f"  I(D;E), mean over layers: {fmt(report['routing'].get('routing/mi/mean'))} nats")
    from ds_moe_div.evaluation.task_report import summary_lines
    lines += summary_lines(report)
    lines += [f"  {w}" for w in report.get("warnings", [])]
    lines.append(f"  report: {rundir.report_md_path(report['eval']['out_dir'])}")
    return "\n".join(lines)
