"""Task accuracy and expert ablation in report.md, the `eval` summary and the `compare` table.

report.json keys (written by runner via tasks.py): `tasks` {cloze: {acc, acc_stderr, acc_norm,
acc_norm_stderr, items, per_domain {name: {...}}, settings}, humaneval: {pass@1, pass@1_stderr, problems,
per_problem}, lm_eval: {task: {metric: value}}} and `ablation` {top_m, masked {domain: {experts, ppl,
delta_ppl, rel, per_domain, own, others, specificity}}, specificity_mean, keep_k {"k=<k'>": {ppl,
delta_ppl, rel, per_domain}}}. Both are {} when not run; reports written before they existed lack them.
`compare` rows are the union over reports of every metric found (a run without it shows n/a).
"""
from __future__ import annotations

from ds_moe_div.evaluation.report import SPECIALISATION_METRICS, fmt, table


def _pm(value, stderr) -> str:
    return fmt(value, 3) if stderr is None else f"{fmt(value, 3)} ± {fmt(stderr, 3)}"


def summary_lines(report: dict) -> list[str]:
    lines = []
    tasks = report.get("tasks") or {}
    if "cloze" in tasks:
        c = tasks["cloze"]
        lines.append(f"  cloze: acc {_pm(c['acc'], c['acc_stderr'])}, acc_norm {_pm(c['acc_norm'], c['acc_norm_stderr'])}"
                     f" ({c['items']} items)")
    if "humaneval" in tasks:
        h = tasks["humaneval"]
        lines.append(f"  humaneval: pass@1 {_pm(h['pass@1'], h['pass@1_stderr'])} ({h['problems']} problems)")
    for task, metrics in (tasks.get("lm_eval") or {}).items():
        shown = ", ".join(f"{k} {_pm(v, metrics.get(k + '_stderr'))}" for k, v in metrics.items()
                          if not k.endswith("_stderr"))
        lines.append(f"  {task}: {shown}")
    ablation = report.get("ablation") or {}
    if ablation.get("masked"):
        lines.append(f"  expert ablation (top-{ablation['top_m']}): specificity own - others, mean over domains "
                     f"{fmt(ablation['specificity_mean'], 3)}")
    return lines


def _tasks_section(report: dict) -> list[str]:
    tasks = report.get("tasks") or {}
    if not tasks:
        return []
    lines = ["## Downstream tasks", ""]
    if "cloze" in tasks:
        c = tasks["cloze"]
        s = c.get("settings", {})
        rows = [["**all**", fmt(c["items"]), _pm(c["acc"], c["acc_stderr"]), _pm(c["acc_norm"], c["acc_norm_stderr"])]]
        rows += [[n, fmt(d["items"]), _pm(d["acc"], d["acc_stderr"]), _pm(d["acc_norm"], d["acc_norm_stderr"])]
                 for n, d in c["per_domain"].items()]
        lines += [(f"Built-in cloze ({s.get('context_tokens')} context tokens, the true {s.get('continuation_tokens')}"
                   f" next tokens vs {s.get('distractors')} same-domain distractors; chance = "
                   f"{fmt(1 / (1 + s.get('distractors', 3)), 2)}; ± standard error):"), "",
                  table(["domain", "items", "acc", "acc_norm"], rows, "r"), ""]
    if "humaneval" in tasks:
        h = tasks["humaneval"]
        lines += [f"HumanEval pass@1 (greedy): {_pm(h['pass@1'], h['pass@1_stderr'])} over {h['problems']} problems.", ""]
    lm = tasks.get("lm_eval") or {}
    if lm:
        rows = [[task, ", ".join(f"{k} {_pm(v, m.get(k + '_stderr'))}" for k, v in m.items() if not k.endswith("_stderr"))]
                for task, m in lm.items()]
        lines += ["lm-eval:", "", table(["task", "metrics"], rows), ""]
    return lines


def _ablation_section(report: dict) -> list[str]:
    ablation = report.get("ablation") or {}
    if not ablation.get("masked") and not ablation.get("keep_k"):
        return []
    names = report["domain_names"]
    rows = [[f"mask {d}", fmt(e["own"], 3), fmt(e["others"], 3), fmt(e["specificity"], 3),
             *[fmt(e["per_domain"][n]["rel"], 3) for n in names]] for d, e in ablation.get("masked", {}).items()]
    rows += [[key, "", "", "", *[fmt(e["per_domain"][n]["rel"], 3) for n in names]]
             for key, e in ablation.get("keep_k", {}).items()]
    figure = [f"![expert ablation]({f})" for f in report.get("figures", []) if f.endswith("expert_ablation.png")]
    return ["## Expert ablation and keep-k", "",
            (f"Relative PPL change PPL / PPL_base - 1 per evaluated domain when each domain's top-"
             f"{ablation.get('top_m')} experts (by held-out selection frequency, per layer, all layers at once) "
             "are masked; own = the masked domain, others = mean of the rest, specificity = own - others. "
             "k=<k'> rows: every token routed to its top-k' experts only."), "",
            table(["ablation", "own", "others", "specificity", *names], rows, "r"), "", *figure, ""]


def markdown_sections(report: dict) -> list[str]:
    return [*_tasks_section(report), *_ablation_section(report)]


def _union(lists) -> list:
    seen: dict = {}
    for items in lists:
        seen.update(dict.fromkeys(items))
    return list(seen)


def compare_rows(reports: list[dict]) -> list[tuple[str, str, list, list | None]]:
    """(csv key, label, value per run, std per run or None): task accuracies, ablation, and every
    `routing/<tag>/mean` scalar not already in the table (the union over the reports)."""
    rows = []
    clozes = [(r.get("tasks") or {}).get("cloze") or {} for r in reports]
    if any(clozes):
        for metric in ("acc", "acc_norm"):
            rows.append((f"tasks/cloze/{metric}", f"cloze {metric}", [c.get(metric) for c in clozes],
                         [c.get(f"{metric}_stderr") for c in clozes]))
        for name in _union((c.get("per_domain") or {}) for c in clozes):
            per = [(c.get("per_domain") or {}).get(name, {}) for c in clozes]
            rows.append((f"tasks/cloze/acc/{name}", f"cloze acc {name}", [p.get("acc") for p in per],
                         [p.get("acc_stderr") for p in per]))
    evals = [(r.get("tasks") or {}).get("humaneval") or {} for r in reports]
    if any(evals):
        rows.append(("tasks/humaneval/pass@1", "HumanEval pass@1", [h.get("pass@1") for h in evals],
                     [h.get("pass@1_stderr") for h in evals]))
    lms = [(r.get("tasks") or {}).get("lm_eval") or {} for r in reports]
    for task in _union(lms):
        metrics = _union([k for k in (m.get(task) or {}) if not k.endswith("_stderr")] for m in lms)
        for metric in metrics:
            rows.append((f"tasks/{task}/{metric}", f"{task} {metric}", [(m.get(task) or {}).get(metric) for m in lms],
                         [(m.get(task) or {}).get(f"{metric}_stderr") for m in lms]))
    ablations = [r.get("ablation") or {} for r in reports]
    if any(a.get("masked") for a in ablations):
        rows.append(("ablation/specificity_mean", "ablation specificity, mean over domains",
                     [a.get("specificity_mean") for a in ablations], None))
        for name in _union((a.get("masked") or {}) for a in ablations):
            entries = [(a.get("masked") or {}).get(name, {}) for a in ablations]
            rows.append((f"ablation/{name}/own", f"ablation mask {name}: own rel. PPL change",
                         [e.get("own") for e in entries], None))
            rows.append((f"ablation/{name}/others", f"ablation mask {name}: others rel. PPL change",
                         [e.get("others") for e in entries], None))
    for key in _union((a.get("keep_k") or {}) for a in ablations):
        rows.append((f"keep_k/{key}/rel", f"keep-k {key}: rel. PPL change",
                     [(a.get("keep_k") or {}).get(key, {}).get("rel") for a in ablations], None))
    known = {f"routing/{tag}/mean" for tag, _ in SPECIALISATION_METRICS}
    for key in _union([k for k in r.get("routing", {}) if k.endswith("/mean")] for r in reports):
        if key not in known and not key.startswith("routing/entropy/"):
            rows.append((key, f"{key.removeprefix('routing/').removesuffix('/mean')}, mean over layers",
                         [r.get("routing", {}).get(key) for r in reports], None))
    return rows


def flat_metrics(report: dict) -> dict[str, float]:
    """{compare key: value} of one report's task and ablation metrics (for the sweep's tables)."""
    return {key: values[0] for key, _, values, _ in compare_rows([report])
            if not key.startswith("routing/") and isinstance(values[0], (int, float))}
