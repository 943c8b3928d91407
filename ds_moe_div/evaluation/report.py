"""One report per checkpoint: report.json (every number, with its config and checkpoint) and report.md
(the tables, with the figures embedded by relative path; readable without TensorBoard).

report.json keys: checkpoint, run_dir, tag, step, split, domain_column, domain_names, tokens, lm_loss,
ppl, per_domain {name: {lm_loss, ppl, tokens}}, delta_ppl {layer_<id> | all_layers: {mean, std, per_seed,
per_domain {name: {mean, std}}}}, permutations {kind, seeds, layer_<id>: [perm per seed]}, routing
(RoutingStats.scalars tags and the specialisation pass's expert_overlap / silhouette), silhouette {sample_size,
max_sample_size, seed, labels, features, distance}, routing_matrices {layer_<id>: {frequency, mean_prob, load, kept_load}},
figures, eval (how it was measured), config (the run's resolved experiment config), warnings (e.g. classes
without a held-out token, with the fix). Undefined values are
null (JSON has no NaN). Files are written atomically.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ds_moe_div import fileio, rundir

TOP_EXPERTS = 3          # experts listed per class in the report's top-experts table
WIDE_TABLE_CLASSES = 8  # above this many classes, class-by-column tables are transposed

# (tag under routing/, label) of the per-layer specialisation metrics, in table order.
SPECIALISATION_METRICS = (
    ("mi", "I(D;E) (nats)"), ("mi_normalized", "I(D;E) / H(D)"), ("mi_normalized_min", "I(D;E) / min(H(D),H(E))"),
    ("purity", "expert purity"), ("max_violation", "MaxVio"), ("load_cv", "load CV"),
    ("dead_experts", "dead experts"), ("dropped_fraction", "dropped fraction"),
    ("d_total", "D_total"), ("d_inter", "D_inter"), ("d_intra", "D_intra"),
    # The orthogonality paper's metrics (metrics/paper.py, docs/METRICS.md).
    ("max_violation_global", "MaxVio_global"), ("routing_variance", "routing variance"),
    ("expert_overlap", "Expert Overlap (mean \\|cos\\|)"), ("coselection_jaccard", "co-selection Jaccard"),
    ("silhouette", "silhouette (cosine, MoE input)"),
    ("expert_output_norm", "mean selected-expert output norm"),  # metrics/output_norm.py
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
    batches = ("the whole split" if e["max_batches"] is None else
               f"at most {e['max_batches']} global batches, rows of every class first")
    return [
        f"# Evaluation: `{r['run_dir']}` at `{r['tag']}` (step {r['step']})", "",
        f"- checkpoint: `{r['checkpoint']}`",
        (f"- held-out split `{r['split']}`, labels `{r['domain_column']}` ({len(r['domain_names'])} classes), "
         f"{fmt(r['tokens'])} target tokens ({batches})"),
        *([f"- labels: {r['labels']}"] if r.get("labels", "true") != "true" else []),
        *[f"- **{w}**" for w in r.get("warnings", [])],
        (f"- {e['world_size']} rank(s) x micro-batch {e['micro_batch_size']}, ep_size {e['ep_size']}, "
         f"{e['dtype']}, eval_capacity_factor {e['eval_capacity_factor']}, {e['passes']} passes in "
         f"{e['seconds']:.0f} s"),
        f"- objectives: {_objectives_line(r['config'])}", "",
    ]


def _loss_section(r: dict) -> list[str]:
    rows = [["**all**", fmt(r["tokens"]), fmt(r["lm_loss"]), fmt(r["ppl"], 2)]]
    rows += [[name, fmt(d["tokens"]), fmt(d["lm_loss"]), fmt(d["ppl"], 2)] for name, d in r["per_domain"].items()]
    return ["## Held-out loss", "", table(["domain", "target tokens", "LM loss (nats)", "PPL"], rows, "r"), ""]


def _delta_table(r: dict) -> str:
    """Few classes: one row per permuted layer, one column per class. Many (> WIDE_TABLE_CLASSES): the
    transpose, one row per class, so the table has layers + 2 columns instead of classes + 2."""
    names, delta = r["domain_names"], r["delta_ppl"]
    if len(names) <= WIDE_TABLE_CLASSES:
        rows = [[key.replace("_", " "), fmt_spread(entry), *[fmt_spread(entry["per_domain"][n]) for n in names]]
                for key, entry in delta.items()]
        return table(["permuted", "all tokens", *names], rows, "r")
    rows = [["**all tokens**", *[fmt_spread(entry) for entry in delta.values()]]]
    rows += [[name, *[fmt_spread(entry["per_domain"][name]) for entry in delta.values()]] for name in names]
    return table(["class", *[key.replace("_", " ") for key in delta]], rows, "r")


def _delta_section(r: dict) -> list[str]:
    p = r["permutations"]
    figure = [f"![delta-PPL]({f})" for f in r["figures"] if f.endswith("delta_ppl.png")]
    return ["## Router-permutation delta-PPL", "",
            (f"PPL(router rows permuted) - PPL, mean ± std over seeds {p['seeds']} ({p['kind']}s of the router "
             "rows of the permuted layer(s); experts untouched). Larger = experts less interchangeable."), "",
            _delta_table(r), "", *figure, ""]


def top_experts(freq_DE: Sequence[Sequence[float | None]], k: int = TOP_EXPERTS) -> list[list[tuple[int, float]]]:
    """Per row (class): its k most selected experts as (expert id, share), largest first; [] for a row
    without data (None/NaN, a class with no held-out token)."""
    out = []
    for row in freq_DE:
        pairs = [(j, float(v)) for j, v in enumerate(row) if v is not None and math.isfinite(float(v))]
        out.append(sorted(pairs, key=lambda p: (-p[1], p[0]))[:k] if any(v > 0 for _, v in pairs) else [])
    return out


def _top_experts_section(r: dict) -> list[str]:
    """Instead of a class x expert matrix per layer: each class's top experts per layer."""
    names, matrices = r["domain_names"], r.get("routing_matrices") or {}
    if not matrices:
        return []
    tops = {key: top_experts(m["frequency"]) for key, m in matrices.items()}
    rows = [[name, *["n/a" if not tops[key][d] else ", ".join(f"e{j} {v:.0%}" for j, v in tops[key][d])
                     for key in matrices]] for d, name in enumerate(names)]
    header = ["class", *[key.replace("_", " ") for key in matrices]]
    return [f"## Top {TOP_EXPERTS} experts per class", "",
            ("Each class's most selected experts and their share of its top-k selections (uniform routing: "
             f"{1 / max(len(next(iter(matrices.values()))['frequency'][0]), 1):.0%} each); "
             "the full matrices are in report.json (routing_matrices) and the heatmaps below."), "",
            table(header, rows), ""]


def _routing_section(r: dict) -> list[str]:
    routing, layers = r["routing"], [k.removeprefix("layer_") for k in r["routing_matrices"]]
    metrics = list(SPECIALISATION_METRICS) + [(f"entropy/{n}", f"H(E \\| {n}) (nats)") for n in r["domain_names"]]
    rows = [[label, *[fmt(routing.get(f"routing/{tag}/layer_{lid}")) for lid in layers],
             fmt(routing.get(f"routing/{tag}/mean"))] for tag, label in metrics]
    padding = routing.get("routing/padding_fraction")
    sil = r.get("silhouette") or {}
    sample = (f" Silhouette: {sil['sample_size']} sampled tokens (at most {sil['max_sample_size']}, seed "
              f"{sil['seed']}), labelled by their {sil['labels']}, {sil['distance']} distance on the "
              f"{sil['features']}.") if sil else ""
    return ["## Specialisation (routing on the held-out text)", "",
            table(["metric", *[f"layer {lid}" for lid in layers], "mean"], rows, "r"), "",
            (f"Counts are top-k selections before the capacity limit over {fmt(int(routing.get('routing/tokens', 0)))}"
             f" labelled tokens (padding fraction {fmt(padding)}); entropies and information in nats.{sample}"), ""]


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


def _training_curves_section(r: dict) -> list[str]:
    curves = [f for f in r["figures"] if f.endswith("training_curves.png")]
    if not curves:
        return []
    note = "MaxVio_global, I(D;E) and D_inter per layer (dashed: mean) from the run's TensorBoard scalars."
    return ["## Routing over training", "", note, "", f"![training curves]({curves[0]})", ""]


def render_markdown(report: dict) -> str:
    from ds_moe_div.evaluation.task_report import markdown_sections  # it imports this module

    config = json.dumps(report["config"], indent=2)
    lines = [*_header(report), *_loss_section(report), *_delta_section(report), *_routing_section(report),
             *_top_experts_section(report), *markdown_sections(report), *_figures_section(report),
             *_training_curves_section(report), "## Config", "",
             "<details><summary>the run's resolved experiment config</summary>", "", "```json", config, "```", "",
             "</details>", ""]
    return "\n".join(lines)
