"""One report per checkpoint: report.json (every number, with its config and checkpoint) and report.md
(the tables, with the figures embedded by relative path; readable without TensorBoard).

report.json keys: checkpoint, run_dir, tag, step, split, domain_column, domain_names, tokens, lm_loss,
ppl, per_domain {name: {lm_loss, ppl, tokens}}, delta_ppl {layer_<id> | all_layers: {mean, std, per_seed,
per_domain {name: {mean, std}}}}, permutations {kind, seeds, layer_<id>: [perm per seed]}, routing
(RoutingStats.scalars tags), routing_matrices {layer_<id>: {frequency, mean_prob, load, kept_load}},
figures, eval (how it was measured), config (the run's resolved experiment config). Undefined values are
null (JSON has no NaN). Files are written atomically.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ds_moe_div import fileio, rundir

# (tag under routing/, label) of the per-layer specialisation metrics, in table order.
SPECIALISATION_METRICS = (
    ("mi", "I(D;E) (nats)"), ("mi_normalized", "I(D;E) / H(D)"), ("mi_normalized_min", "I(D;E) / min(H(D),H(E))"),
    ("purity", "expert purity"), ("max_violation", "MaxVio"), ("load_cv", "load CV"),
    ("dead_experts", "dead experts"), ("dropped_fraction", "dropped fraction"),
    ("d_total", "D_total"), ("d_inter", "D_inter"), ("d_intra", "D_intra"),
)


def plain(value):
    """JSON-ready: tensors/arrays -> lists, NaN/inf -> None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    json_path = fileio.write_json(rundir.report_path(out_dir), plain(report))
    md_path = fileio.write_text(rundir.report_md_path(out_dir), render_markdown(report))
    return json_path, md_path


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def fmt_spread(entry: dict, digits: int = 3) -> str:
    if entry.get("mean") is None:
        return "n/a"
    return f"{fmt(entry['mean'], digits)} ± {fmt(entry['std'], digits)}"


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (n - 1) of the values that are not None: (None, None) without any; the std of
    a single value is NaN (undefined), never 0."""
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return None, None
    mean = sum(defined) / len(defined)
    if len(defined) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in defined) / (len(defined) - 1))


def table(header: list[str], rows: list[list[str]], align: str = "l") -> str:
    """A markdown table; align "r" right-aligns every column but the first."""
    rule = ["---"] + ["---:" if align == "r" else "---"] * (len(header) - 1)
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _objectives_line(config: dict) -> str:
    parts = []
    for name, term in config.get("objectives", {}).items():
        if isinstance(term, dict) and term.get("coef") not in (0, 0.0, None):
            form = f" ({term['form']})" if "form" in term else ""
            parts.append(f"{name} {term['coef']}{form}")
    return ", ".join(parts) or "LM loss only"


def _header(r: dict) -> list[str]:
    e = r["eval"]
    batches = "the whole split" if e["max_batches"] is None else f"at most {e['max_batches']} global batches"
    return [
        f"# Evaluation: `{r['run_dir']}` at `{r['tag']}` (step {r['step']})", "",
        f"- checkpoint: `{r['checkpoint']}`",
        (f"- held-out split `{r['split']}`, labels `{r['domain_column']}` ({len(r['domain_names'])} classes), "
         f"{fmt(r['tokens'])} target tokens ({batches})"),
        *([f"- labels: {r['labels']}"] if r.get("labels", "true") != "true" else []),
        (f"- {e['world_size']} rank(s) x micro-batch {e['micro_batch_size']}, ep_size {e['ep_size']}, "
         f"{e['dtype']}, eval_capacity_factor {e['eval_capacity_factor']}, {e['passes']} passes in "
         f"{e['seconds']:.0f} s"),
        f"- objectives: {_objectives_line(r['config'])}", "",
    ]


def _loss_section(r: dict) -> list[str]:
    rows = [["**all**", fmt(r["tokens"]), fmt(r["lm_loss"]), fmt(r["ppl"], 2)]]
    rows += [[name, fmt(d["tokens"]), fmt(d["lm_loss"]), fmt(d["ppl"], 2)] for name, d in r["per_domain"].items()]
    return ["## Held-out loss", "", table(["domain", "target tokens", "LM loss (nats)", "PPL"], rows, "r"), ""]


def _delta_section(r: dict) -> list[str]:
    p = r["permutations"]
    names = r["domain_names"]
    rows = [[key.replace("_", " "), fmt_spread(entry), *[fmt_spread(entry["per_domain"][n]) for n in names]]
            for key, entry in r["delta_ppl"].items()]
    figure = [f"![delta-PPL]({f})" for f in r["figures"] if f.endswith("delta_ppl.png")]
    return ["## Router-permutation delta-PPL", "",
            (f"PPL(router rows permuted) - PPL, mean ± std over seeds {p['seeds']} ({p['kind']}s of the router "
             "rows of the permuted layer(s); experts untouched). Larger = experts less interchangeable."), "",
            table(["permuted", "all tokens", *names], rows, "r"), "", *figure, ""]


def _routing_section(r: dict) -> list[str]:
    routing, layers = r["routing"], [k.removeprefix("layer_") for k in r["routing_matrices"]]
    metrics = list(SPECIALISATION_METRICS) + [(f"entropy/{n}", f"H(E \\| {n}) (nats)") for n in r["domain_names"]]
    rows = [[label, *[fmt(routing.get(f"routing/{tag}/layer_{lid}")) for lid in layers],
             fmt(routing.get(f"routing/{tag}/mean"))] for tag, label in metrics]
    padding = routing.get("routing/padding_fraction")
    return ["## Specialisation (routing on the held-out text)", "",
            table(["metric", *[f"layer {lid}" for lid in layers], "mean"], rows, "r"), "",
            (f"Counts are top-k selections before the capacity limit over {fmt(int(routing.get('routing/tokens', 0)))}"
             f" labelled tokens (padding fraction {fmt(padding)}); entropies and information in nats."), ""]


def _figures_section(r: dict) -> list[str]:
    heatmaps = [f for f in r["figures"] if "heatmap" in f]
    summary = [f for f in heatmaps if f.endswith("all_layers.png")]
    lines = ["## Expert-by-domain heatmaps", "",
             ("Share of each domain's top-k selections that went to each expert (rows sum to 1; "
              "1/E everywhere = no specialisation)."), ""]
    lines += [f"![all layers]({f})" for f in summary] + [""]
    for f in heatmaps:
        if f not in summary:
            lines += [f"### {Path(f).stem.removeprefix('heatmap_').replace('_', ' ')}", "", f"![{Path(f).stem}]({f})", ""]
    return lines


def render_markdown(report: dict) -> str:
    from ds_moe_div.evaluation.task_report import markdown_sections  # it imports this module

    config = json.dumps(report["config"], indent=2)
    lines = [*_header(report), *_loss_section(report), *_delta_section(report), *_routing_section(report),
             *markdown_sections(report), *_figures_section(report), "## Config", "",
             "<details><summary>the run's resolved experiment config</summary>", "", "```json", config, "```", "",
             "</details>", ""]
    return "\n".join(lines)
