"""What `eval` adds to the held-out report: downstream tasks (--tasks) and expert ablation / keep-k.

    python -m ds_moe_div eval --run-dir runs/tiny --tasks cloze,humaneval,arc_easy [--task-limit 100]
        [--ablation auto|on|off] [--ablation-top-m M]

--tasks: `cloze` (the built-in per-domain cloze task on the evaluated split, cloze.py, scored by our own
harness with lm-eval's semantics), `humaneval` (humaneval.py, executes generated code), any other name is
an lm-eval task run through lm_eval.simple_evaluate on the model in memory (lm_eval_bridge.py; needs
`pip install -e .[eval]` and the task's data). Tasks run on one process (EP=1 loads any checkpoint).
Ablation (ablation.py): one held-out pass per domain with its top-m experts masked, plus keep-k passes;
`auto` runs it when there are at most 12 domains (each domain costs one pass).
"""
from __future__ import annotations

import argparse

MAX_AUTO_ABLATION_DOMAINS = 12
BUILT_IN = ("cloze", "humaneval")


def _task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one task, e.g. cloze,humaneval,arc_easy")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tasks and ablation")
    group.add_argument("--tasks", type=_task_list, default=[], metavar="A,B,...",
                       help="cloze, humaneval and/or lm-eval task names (one process only)")
    group.add_argument("--task-limit", type=int, metavar="N", help="at most N examples per lm-eval task / HumanEval")
    group.add_argument("--num-fewshot", type=int, metavar="N", help="lm-eval few-shot examples (task default)")
    group.add_argument("--lm-eval-include-path", metavar="DIR", help="more lm-eval task YAMLs (TaskManager include_path)")
    group.add_argument("--task-batch-size", type=int, default=16, metavar="N", help="sequences per scoring forward")
    group.add_argument("--cloze-per-domain", type=int, default=50, metavar="N", help="cloze items per domain")
    group.add_argument("--cloze-context-tokens", type=int, default=24, metavar="N")
    group.add_argument("--cloze-continuation-tokens", type=int, default=8, metavar="N")
    group.add_argument("--cloze-seed", type=int, default=0)
    group.add_argument("--ablation", choices=("auto", "on", "off"), default="auto",
                       help=f"expert ablation + keep-k (auto: on with <= {MAX_AUTO_ABLATION_DOMAINS} domains)")
    group.add_argument("--ablation-top-m", type=int, metavar="M",
                       help="experts masked per layer and domain (default min(k, num_experts - k))")


def ablation_enabled(args, num_domains: int) -> bool:
    return args.ablation == "on" or (args.ablation == "auto" and num_domains <= MAX_AUTO_ABLATION_DOMAINS)


def ablation_passes(args, num_domains: int, k: int, num_experts: int) -> int:
    from ds_moe_div.evaluation.ablation import default_top_m

    top_m = args.ablation_top_m if args.ablation_top_m is not None else default_top_m(num_experts, k)
    if not ablation_enabled(args, num_domains) or top_m < 1:
        return 0
    return num_domains + k - 1


def run_ablation(args, run_pass, layers, layer_ids, stats, base, *, k: int, num_experts: int, progress) -> dict:
    """{"top_m", "masked", "specificity_mean", "keep_k"}, or {} when off."""
    from ds_moe_div.evaluation.ablation import default_top_m, expert_ablation, keep_k_evaluation

    if not ablation_enabled(args, len(base.per_domain)):
        return {}
    top_m = args.ablation_top_m if args.ablation_top_m is not None else default_top_m(num_experts, k)
    if not 1 <= top_m <= num_experts - k:
        if args.ablation_top_m is not None:
            raise ValueError(f"--ablation-top-m {top_m}: mask between 1 and num_experts - k = {num_experts - k} "
                             "experts (k must remain)")
        return {}
    matrices = stats.matrices()
    frequencies = [matrices[f"routing/frequency/layer_{lid}"] for lid in layer_ids]
    result = expert_ablation(run_pass, layers, layer_ids, frequencies, base, top_m=top_m, progress=progress)
    result["keep_k"] = keep_k_evaluation(run_pass, layers, base, progress=progress)
    return result


def check_tasks(args, world_size: int) -> None:
    if args.tasks and world_size != 1:
        raise ValueError(f"--tasks runs on one process (world size {world_size}): run `python -m ds_moe_div eval "
                         "... --tasks ...` without the deepspeed launcher (any ep_size loads with EP=1)")


def run_tasks(args, loaded, split, names) -> dict:
    """{"cloze": ..., "humaneval": ..., "lm_eval": {task: {metric: value}}} for the requested tasks."""
    if not args.tasks:
        return {}
    from ds_moe_div.data import load_tokenizer
    from ds_moe_div.evaluation.scoring import ModelScorer

    data = loaded.data
    scorer = ModelScorer(loaded.model, load_tokenizer(data.tokenizer_path, project_tokens=False), eos_id=data.eos_id, pad_id=data.pad_id,
                         max_length=loaded.cfg.data.seq_len, batch_size=args.task_batch_size)
    out: dict = {}
    if "cloze" in args.tasks:
        out["cloze"] = _cloze(args, scorer, split, names)
    if "humaneval" in args.tasks:
        from ds_moe_div.evaluation.humaneval import load_problems, run_humaneval
        out["humaneval"] = run_humaneval(scorer, load_problems(args.task_limit))
    others = [t for t in args.tasks if t not in BUILT_IN]
    if others:
        from ds_moe_div.evaluation.lm_eval_bridge import DsMoeLM, metrics_of, run_lm_eval
        out["lm_eval"] = metrics_of(run_lm_eval(DsMoeLM(scorer), others, limit=args.task_limit,
                                                num_fewshot=args.num_fewshot, include_path=args.lm_eval_include_path))
    return out


def _cloze(args, scorer, split, names) -> dict:
    from ds_moe_div.evaluation.cloze import cloze_items, score_cloze

    settings = {"context_tokens": args.cloze_context_tokens, "continuation_tokens": args.cloze_continuation_tokens,
                "distractors": 3, "per_domain": args.cloze_per_domain, "seed": args.cloze_seed}
    items = cloze_items(split, scorer.tokenizer, names, eos_id=scorer.eos_id, **settings)
    if not items:
        raise ValueError(f"the cloze task found no document with {settings['context_tokens']} + "
                         f"{settings['continuation_tokens']} tokens inside one packed row and 3 others of its "
                         "domain: lower --cloze-context-tokens / --cloze-continuation-tokens")
    result = score_cloze(scorer, items)
    result["settings"] = settings
    result["domains_without_items"] = [n for n in names if n not in result["per_domain"]]
    return result
