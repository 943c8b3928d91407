"""Paired effects of a sweep's contrasts: each variant minus its reference, seed by seed, in nats.

    found = effects(results, contrasts=sweep.contrast_pairs(), endpoints=sweep.endpoints)
    write_effects(found, results, out_dir, title="objectives")     # effects.csv, effects.md

Pairing (`pair`): a contrast uses every seed of both variants or none. Each seed's two runs must have
scored the same held-out tokens: equal `held_out_sha256` where both eval reports carry one (the tokens
themselves); otherwise equal held-out settings from the planned configs (`held_out_fields`: the data
section that fixes the split, tokenizer and packing, the eval split and batch count, the ranks and micro
batch; data.shuffle_labels_seed is left out under `mixed` packing, where it changes no token) and equal
token counts. Anything else refuses the whole contrast and says why. Same seed + same data settings is
also the same training-data order.

Metrics (nats): lm_loss; lm_loss/<domain> = ln ppl/<domain>; delta_logppl/layer_<i> = ln(PPL + ΔPPL_i)
- ln PPL, the router-permutation effect of layer i as a log-PPL (ΔPPL_i is the mean over permutations);
plus routing and validation metrics as exploratory rows. Per metric and contrast: mean paired
difference, sample sd, 95% t interval, 95% percentile-bootstrap interval (10,000 resamples, seed 0),
two-sided paired t p, exact sign-flip p, the MDE at 80% power for the n used (central t, see
ds_moe_div/stats.py), the n that 80% power needs at the observed effect, and for the pre-registered
endpoints Holm's adjusted p over the family (every contrast x every endpoint of the sweep).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ds_moe_div import fileio, stats
from ds_moe_div.config_loader import flatten, to_dict
from ds_moe_div.evaluation.report import table

ALPHA, POWER, CONFIDENCE = 0.05, 0.8, 0.95
SECONDARY = ("lm_loss", "tasks/cloze/acc", "final/val_lm_loss", "routing/mi/mean", "routing/max_violation/mean",
             "routing/dropped_fraction/mean", "routing/expert_output_norm/mean")
_NOT_HELD_OUT = ("data.streaming", "data.num_proc", "data.cache_dir")


def held_out_fields(config, *, split: str, max_batches: int | None, num_ranks: int) -> dict:
    """The settings that fix which held-out tokens an evaluation scores (see the module docstring)."""
    data = {f"data.{k}": v for k, v in flatten(to_dict(config.data)).items() if f"data.{k}" not in _NOT_HELD_OUT}
    if config.data.packing == "mixed":
        data.pop("data.shuffle_labels_seed", None)  # mixed packing: the labels move, the tokens do not
    return {**data, "eval.split": split, "eval.max_batches": max_batches, "num_ranks": num_ranks,
            "train.micro_batch_size": config.train.micro_batch_size}


def fields_digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """lm_loss/<domain> and delta_logppl/layer_<i> (nats) from the PPL columns, where not present."""
    out = dict(metrics)
    for key, value in metrics.items():
        if key.startswith("ppl/") and value > 0:
            out.setdefault("lm_loss/" + key[4:], math.log(value))
        if key.startswith("delta_ppl/layer_") and metrics.get("ppl", 0) > 0 and metrics["ppl"] + value > 0:
            out.setdefault("delta_logppl/" + key.split("/", 1)[1], math.log1p(value / metrics["ppl"]))
    return out


def _same_held_out(a, b) -> str | None:
    """None when runs a and b scored the same held-out tokens, else the reason they did not (or may not)."""
    if a.held_out_sha256 and b.held_out_sha256:
        return None if a.held_out_sha256 == b.held_out_sha256 else "their eval reports' held_out_sha256 differ"
    if a.held_out is None or b.held_out is None:
        return "no held_out_sha256 and no planned config to compare the held-out settings with"
    diff = [f"{k} ({a.held_out.get(k)!r} vs {b.held_out.get(k)!r})" for k in sorted(set(a.held_out) | set(b.held_out))
            if a.held_out.get(k) != b.held_out.get(k)]
    if diff:
        return "other held-out tokens: " + "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")
    ta, tb = a.metrics.get("tokens"), b.metrics.get("tokens")
    if ta is not None and tb is not None and ta != tb:
        return f"other held-out token counts ({ta:.0f} vs {tb:.0f})"
    return None


@dataclass(frozen=True)
class Pairing:
    seeds: tuple[int, ...]  # empty when refused
    reason: str = ""
    not_run: bool = False  # one side has no evaluated run at all: outside the Holm family


def pair(variant_runs: list, reference_runs: list, *, variant: str, reference: str) -> Pairing:
    """All seeds of both variants, each pair on the same held-out tokens, or a refusal with the reason."""
    a = {r.seed: r for r in variant_runs}
    b = {r.seed: r for r in reference_runs}
    if not a or not b:
        return Pairing((), f"no evaluated run of {variant if not a else reference}", not_run=True)
    if set(a) != set(b):
        return Pairing((), f"seeds differ ({variant}: {sorted(a)}, {reference}: {sorted(b)}); a paired "
                           "comparison uses every seed of both: run the missing seeds")
    for seed in sorted(a):
        reason = _same_held_out(a[seed], b[seed])
        if reason:
            return Pairing((), f"seed {seed}: {reason}; the losses are not paired")
    return Pairing(tuple(sorted(a)))


@dataclass
class Effect:
    variant: str
    reference: str
    metric: str
    primary: bool
    n: int = 0
    seeds: str = ""
    variant_mean: float = math.nan
    reference_mean: float = math.nan
    mean_diff: float = math.nan
    sd_diff: float = math.nan
    ci_t_low: float = math.nan
    ci_t_high: float = math.nan
    ci_boot_low: float = math.nan
    ci_boot_high: float = math.nan
    p_t: float = math.nan
    p_sign_flip: float = math.nan
    mde: float = math.nan
    n_for_observed: float = math.nan
    p_holm: float = math.nan
    reason: str = ""
    diffs: list[float] = field(default_factory=list, repr=False)

    def reading(self) -> str:
        """Plain words: a difference the test detects, or the size it could have detected."""
        if self.reason:
            return "not compared"
        if self.sd_diff == 0 and self.mean_diff == 0:
            return "identical in every pair"
        p = self.p_holm if self.primary else self.p_t
        if p < ALPHA:
            return ("lower" if self.mean_diff < 0 else "higher") + (" (Holm)" if self.primary else " (unadjusted)")
        return f"not detected (MDE {self.mde:.2g})" if math.isfinite(self.mde) else "not detected"


def _effect(variant: str, reference: str, metric: str, primary: bool, pairing: Pairing, by_key: dict) -> Effect:
    e = Effect(variant, reference, metric, primary, reason=pairing.reason)
    if pairing.reason:
        return e
    missing = [s for s in pairing.seeds for v in (variant, reference) if metric not in by_key[(v, s)].metrics]
    if missing:
        e.reason = f"{metric} missing in some runs (seeds {sorted(set(missing))})"
        return e
    t = {s: by_key[(variant, s)].metrics[metric] for s in pairing.seeds}
    r = {s: by_key[(reference, s)].metrics[metric] for s in pairing.seeds}
    d = stats.paired_differences(treatment=t, reference=r)
    e.n, e.seeds, e.diffs = len(d), " ".join(map(str, pairing.seeds)), d
    e.variant_mean, e.reference_mean = stats.mean(list(t.values())), stats.mean(list(r.values()))
    e.mean_diff, e.sd_diff = stats.mean(d), stats.sample_sd(d)
    e.ci_t_low, e.ci_t_high = stats.t_interval(d, confidence=CONFIDENCE)
    e.ci_boot_low, e.ci_boot_high = stats.bootstrap_interval(d, confidence=CONFIDENCE, seed=0)
    e.p_t = stats.paired_t_test(d).p
    e.p_sign_flip = stats.sign_flip_p(d) if len(d) <= stats.EXACT_SIGN_FLIP_MAX_N else math.nan
    e.mde = stats.mde(sd=e.sd_diff, n=e.n, alpha=ALPHA, power=POWER)
    if e.n >= 2 and e.mean_diff != 0 and math.isfinite(e.sd_diff):
        try:
            e.n_for_observed = stats.n_for_mde(sd=e.sd_diff, target=e.mean_diff, alpha=ALPHA, power=POWER)
        except ValueError:
            e.n_for_observed = math.inf
    return e


def _secondary_metrics(runs: list, endpoints) -> list[str]:
    """The exploratory metrics any of `runs` has, in table order."""
    keys = list(dict.fromkeys(k for r in runs for k in r.metrics))
    domains = [k for k in keys if k.startswith("lm_loss/")]
    layers = sorted((k for k in keys if k.startswith("delta_logppl/layer_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    return [m for m in (*SECONDARY[:1], *domains, *layers, *SECONDARY[1:]) if m not in endpoints and m in keys]


def effects(results: list, *, contrasts: list[tuple[str, str]], endpoints) -> tuple[list[Effect], dict]:
    """(every effect row, {(variant, reference): Pairing}); Holm over the primary rows of all contrasts."""
    runs = [r for r in results if r.evaluated]
    by_key = {(r.variant, r.seed): r for r in runs}
    found, pairings = [], {}
    for variant, reference in contrasts:
        mine, theirs = [r for r in runs if r.variant == variant], [r for r in runs if r.variant == reference]
        pairing = pair(mine, theirs, variant=variant, reference=reference)
        pairings[(variant, reference)] = pairing
        found += [_effect(variant, reference, m, True, pairing, by_key) for m in endpoints]
        secondary = [m for m in _secondary_metrics(mine, endpoints) if m in _secondary_metrics(theirs, endpoints)]
        found += [_effect(variant, reference, m, False, pairing, by_key) for m in secondary]
    primary = [e for e in found if e.primary and not pairings[(e.variant, e.reference)].not_run]
    for e, p in zip(primary, stats.holm([e.p_t for e in primary])):
        e.p_holm = p
    return found, pairings


def _num(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:+.{digits}g}" if digits > 0 else f"{x:.0f}"


def _p(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def _rows(found: list[Effect]) -> list[list[str]]:
    return [[e.metric, str(e.n), _num(e.mean_diff), f"{e.sd_diff:.2g}" if e.n else "",
             f"[{_num(e.ci_t_low)}, {_num(e.ci_t_high)}]" if e.n else "",
             f"[{_num(e.ci_boot_low)}, {_num(e.ci_boot_high)}]" if e.n else "",
             _p(e.p_t), _p(e.p_sign_flip), _p(e.p_holm), f"{e.mde:.2g}" if e.n else "",
             _num(e.n_for_observed, 0), e.reading()] for e in found]


HEADER = ["metric", "n", "mean Δ", "sd Δ", "95% CI (t)", "95% CI (bootstrap)", "p (t)", "p (sign-flip)",
          "p (Holm)", "MDE (80%)", "n for 80% at Δ", "reading"]


def markdown(found: list[Effect], pairings: dict, results: list, *, title: str, endpoints, command: str) -> str:
    runs = [r for r in results if r.evaluated]
    tokens = sorted({int(r.metrics["tokens"]) for r in runs if "tokens" in r.metrics})
    scored = sorted({(int(r.metrics["held_out/global_batches"]), int(r.metrics["held_out/split_global_batches"]))
                     for r in runs if "held_out/split_global_batches" in r.metrics})
    size = (f"Held-out target tokens scored per run: {', '.join(f'{t:,}' for t in tokens) or 'not in these records'}"
            + (" (" + "; ".join(f"{a} of the split's {b} global batches" for a, b in scored) + ")" if scored else
               " (the split's size was not recorded by these reports)") + ".")
    text = [f"# Effects: {title}\n",
            f"Regenerate: `{command}`\n",
            "Paired differences variant − reference over the same seeds (same data order, same held-out tokens), "
            "in nats (log-PPL); negative = lower loss. 95% intervals by Student t (n−1 df) and by percentile "
            "bootstrap (10,000 resamples, seed 0; too narrow to trust at n ≤ 5). p: two-sided paired t and exact "
            "sign-flip permutation (smallest possible value 2/2^n: 0.25 at n = 3). MDE: the smallest true "
            "difference a two-sided paired t test at α = 0.05 detects with 80% power at this n and the observed "
            "sd (central-t approximation). "
            f"Endpoint family: {', '.join(endpoints)} x the {sum(not p.not_run for p in pairings.values())} "
            "declared contrasts that were run; Holm's adjustment runs over all of them (a run contrast that "
            "cannot be paired counts as p = 1). Other rows are exploratory and unadjusted. " + size + "\n"]
    primary = [e for e in found if e.primary]
    text += ["## Endpoint family (Holm-adjusted)\n",
             table(["contrast"] + HEADER, [[f"{e.variant} − {e.reference}"] + row
                                          for e, row in zip(primary, _rows(primary))]) + "\n"]
    refused = [(k, p) for k, p in pairings.items() if p.reason]
    if refused:
        text += ["Not compared:\n"] + [f"- {v} − {r}: {p.reason}" for (v, r), p in refused] + [""]
    for (variant, reference), pairing in pairings.items():
        if pairing.reason:
            continue
        rows = [e for e in found if e.variant == variant and e.reference == reference and not e.primary]
        text += [f"## {variant} − {reference} (seeds {' '.join(map(str, pairing.seeds))}), exploratory rows\n",
                 table(HEADER, _rows(rows)) + "\n"]
    return "\n".join(text)


def csv_rows(found: list[Effect]) -> list[dict]:
    out = []
    for e in found:
        row = {k: v for k, v in asdict(e).items() if k != "diffs"}
        row["diffs"] = " ".join(repr(d) for d in e.diffs)
        row["reading"] = e.reading()
        out.append(row)
    return out


def write_effects(found: list[Effect], pairings: dict, results: list, out_dir: Path, *, title: str, endpoints,
                  command: str) -> list[Path]:
    from ds_moe_div.sweep.aggregate import to_csv

    paths = [out_dir / "effects.md", out_dir / "effects.csv"]
    fileio.write_text(paths[0], markdown(found, pairings, results, title=title, endpoints=endpoints, command=command))
    fileio.write_text(paths[1], to_csv(csv_rows(found)))
    return paths
