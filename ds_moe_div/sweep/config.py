"""The sweep file: a base experiment config, named variants (overrides), seeds; loaded strictly.

    sweep = load_sweep("ds_configs/sweeps/objectives.json")
    sweep.variants["ed3_0.01"].overrides  # ("objectives.divergence.coef=0.01",)

Schema (JSON; unknown keys fail with their dotted path, like the experiment config)::

    {"name": "objectives",
     "base_config": "ds_configs/experiments/tiny.json",   # relative to the sweep file, the repo or cwd
     "deepspeed_config": "ds_configs/ds_zero2_cpu.json",
     "base_overrides": ["train.steps=500", ...],          # applied to every run, before the variant's
     "variants": {"baseline": [],                          # a list of overrides, or an object:
                  "ft": {"overrides": [...], "init_from": "baseline"}},  # start from that variant's run
     "seeds": [0, 1, 2],                                   # train.seed=<k>; run dir output_dir/<variant>/seed<k>
     "output_dir": "runs/sweeps/objectives",               # default runs/sweeps/<name>
     "num_ranks": 2, "reference": "baseline",              # the variant the table's differences refer to
     "eval": {"split": "test", "permutation_seeds": 3, "max_batches": 50, "domain_column": "domain",
              "args": ["--tasks", "cloze"]},                    # more `python -m ds_moe_div eval` arguments
     "quick": {"base_config": "...", "overrides": [...], "seeds": [0], "variants": ["baseline", ...]}}

An override value may contain `{seed}` (replaced by the run's seed, e.g. a shuffle seed per run).
Overrides apply in this order: base_overrides, the variant's, quick's (with --quick), then the run's own
train.seed / train.run_dir / train.init_from. `schedule_follows_steps` (default true) sets a WarmupDecayLR /
WarmupCosineLR scheduler's total_num_steps to each run's train.steps, also where the DeepSpeed file sets
another value (in a copy of the file written into the run dir); false keeps the file's value, and a value
that disagrees with train.steps is then refused by the trainer.

Two more keys declare the paired comparisons the effects table reports (sweep/effects.py), e.g.
`"contrasts": ["ed3_0.01", {"variant": "ed49", "reference": "baseline49"}], "endpoints": ["lm_loss"]`:
`contrasts` compare each variant with its `reference` (the sweep's by default; without `contrasts`, every
variant with the sweep's reference), seed by seed. `endpoints` name the metrics of the family that
Holm's correction runs over (run metrics as in runs.csv: lm_loss, lm_loss/<domain>,
delta_logppl/layer_<i>, routing/<...>/mean, final/val_lm_loss, or a metric a later eval adds); every
other metric is reported unadjusted, as exploratory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ds_moe_div.config_loader import ConfigError, from_dict, load_file

REPO_ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_EVAL_OWNED = ("--run-dir", "--checkpoint", "--split", "--permutation-seeds", "--max-batches", "--domain-column",
               "--out")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_overrides(overrides: tuple[str, ...], where: str) -> None:
    for item in overrides:
        key, sep, _ = item.partition("=")
        _require(bool(sep) and all(key.strip().split(".")),
                 f"{where}: malformed override {item!r}; write it as 'a.b.c=value'")
        _require(key.strip() not in ("train.seed", "train.run_dir", "train.resume"),
                 f"{where}: {key.strip()} is set by the sweep for each run (seeds, output_dir); remove {item!r}")


@dataclass(frozen=True)
class VariantSpec:
    overrides: tuple[str, ...] = ()
    init_from: str | None = None  # another variant: each seed starts from that variant's run of the same seed

    def __post_init__(self):
        _check_overrides(self.overrides, "overrides")
        _require(not any(o.split("=", 1)[0].strip() == "train.init_from" for o in self.overrides) or
                 self.init_from is None, "give either init_from (a variant) or a train.init_from override, not both")


@dataclass(frozen=True)
class EvalSpec:
    split: Literal["val", "test"] = "test"
    permutation_seeds: int = 3
    max_batches: int | None = None  # None: the whole split
    # Label every run's held-out tokens with this corpus column (e.g. "domain"), so that runs trained
    # on other label schemes are compared on the same per-domain PPL and routing statistics.
    domain_column: str | None = None
    # More arguments of `python -m ds_moe_div eval`, e.g. ["--tasks", "cloze", "--ablation", "on"] (evaluation/tasks.py).
    args: tuple[str, ...] = ()

    def __post_init__(self):
        _require(self.permutation_seeds >= 0, f"permutation_seeds={self.permutation_seeds} must be >= 0")
        owned = [a for a in self.args if a.split("=", 1)[0] in _EVAL_OWNED]
        _require(not owned, f"eval.args {owned}: the sweep sets these from eval's own keys and the run; remove them")
        _require(self.max_batches is None or self.max_batches >= 1, f"max_batches={self.max_batches} must be >= 1")


@dataclass(frozen=True)
class ContrastSpec:
    """One paired comparison: `variant` minus `reference` (None: the sweep's reference), seed by seed."""
    variant: str
    reference: str | None = None


_ENDPOINT = re.compile(r"[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*")


def _check_effects(sweep: SweepConfig) -> None:
    _require(len(sweep.endpoints) >= 1 and len(set(sweep.endpoints)) == len(sweep.endpoints),
             f"endpoints={list(sweep.endpoints)}: name at least one metric (e.g. lm_loss), each once")
    bad = [e for e in sweep.endpoints if not _ENDPOINT.fullmatch(e)]
    _require(not bad, f"endpoints {bad}: write metric names as in runs.csv, e.g. lm_loss or lm_loss/math")
    seen = set()
    for i, c in enumerate(sweep.contrasts or ()):
        ref = c.reference or sweep.reference_variant
        for key, name in (("variant", c.variant), ("reference", ref)):
            _require(name in sweep.variants, f"contrasts[{i}].{key}={name!r} is not a variant; variants: "
                     f"{list(sweep.variants)}")
        _require(c.variant != ref, f"contrasts[{i}]: {c.variant!r} against itself; name another reference")
        _require((c.variant, ref) not in seen, f"contrasts[{i}]: {c.variant!r} vs {ref!r} is listed twice")
        seen.add((c.variant, ref))


@dataclass(frozen=True)
class QuickSpec:
    """The --quick version: minutes on a CPU, what CI smoke-tests."""
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] | None = None  # None: every variant
    base_config: str | None = None  # None: the sweep's
    eval: EvalSpec | None = None  # None: the sweep's
    output_dir: str | None = None  # None: <output_dir>-quick

    def __post_init__(self):
        _check_overrides(self.overrides, "overrides")
        _require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds must be distinct, >= 1")


@dataclass(frozen=True)
class SweepConfig:
    name: str
    base_config: str
    deepspeed_config: str
    variants: dict[str, VariantSpec]
    base_overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    output_dir: str | None = None  # None: runs/sweeps/<name>
    num_ranks: int = 2
    reference: str | None = None  # None: the first variant
    schedule_follows_steps: bool = True
    eval: EvalSpec = field(default_factory=EvalSpec)
    quick: QuickSpec | None = None
    endpoints: tuple[str, ...] = ("lm_loss",)
    contrasts: tuple[ContrastSpec, ...] | None = None  # None: every other variant against `reference`

    def __post_init__(self):
        _require(bool(_NAME.fullmatch(self.name)), f"name={self.name!r}: use letters, digits and _.+-")
        _require(len(self.variants) >= 1, "variants is empty: name at least one variant")
        for name, spec in self.variants.items():
            _require(bool(_NAME.fullmatch(name)), f"variant name {name!r}: use letters, digits and _.+- (it is a folder)")
            _require(spec.init_from is None or spec.init_from in self.variants,
                     f"variants.{name}.init_from={spec.init_from!r} is not a variant; variants: {list(self.variants)}")
        _check_overrides(self.base_overrides, "base_overrides")
        _require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds must be distinct, >= 1")
        _require(self.num_ranks >= 1, f"num_ranks={self.num_ranks} must be >= 1")
        _require(self.reference is None or self.reference in self.variants,
                 f"reference={self.reference!r} is not a variant; variants: {list(self.variants)}")
        unknown = [v for v in (self.quick.variants or ()) if v not in self.variants] if self.quick else []
        _require(not unknown, f"quick.variants names unknown variants {unknown}; variants: {list(self.variants)}")
        dependency_order(self.variants)  # raises on a cycle
        _check_effects(self)

    @property
    def reference_variant(self) -> str:
        return self.reference or next(iter(self.variants))

    def contrast_pairs(self) -> list[tuple[str, str]]:
        """(variant, reference) of every declared contrast; by default every variant vs the reference."""
        if self.contrasts is None:
            return [(v, self.reference_variant) for v in self.variants if v != self.reference_variant]
        return [(c.variant, c.reference or self.reference_variant) for c in self.contrasts]


def dependency_order(variants: dict[str, VariantSpec]) -> list[str]:
    """Variant names with every init_from parent before its children; otherwise in file order."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise ValueError(f"init_from forms a cycle: {cycle}")
        visiting.append(name)
        parent = variants[name].init_from
        if parent is not None:
            visit(parent)
        visiting.pop()
        order.append(name)

    for name in variants:
        visit(name)
    return order


def resolve_path(path: str, sweep_file: Path) -> Path:
    """An absolute path, or the first that exists of: next to the sweep file, the repo root, the cwd."""
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [sweep_file.parent / p, REPO_ROOT / p, Path.cwd() / p]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{sweep_file}: file {path!r} not found; looked in " + ", ".join(str(c) for c in candidates))


def _normalise(data: dict) -> dict:
    """Accept the short form {"variant": [overrides...]} next to {"variant": {"overrides": [...], ...}}."""
    variants = data.get("variants")
    if isinstance(variants, dict):
        data = dict(data, variants={k: {"overrides": v} if isinstance(v, list) else v for k, v in variants.items()})
    contrasts = data.get("contrasts")
    if isinstance(contrasts, list):  # "variant" is short for {"variant": "variant"}
        data = dict(data, contrasts=[{"variant": c} if isinstance(c, str) else c for c in contrasts])
    return data


def load_sweep(path) -> SweepConfig:
    """Load and validate a sweep file (JSON or YAML); errors name the file and the dotted key."""
    path = Path(path)
    data = _normalise(load_file(path))
    try:
        return from_dict(SweepConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
