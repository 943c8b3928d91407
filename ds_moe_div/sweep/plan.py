"""The runs of a sweep, in dependency order, and the state each one's run dir is in.

    plan = build_plan(load_sweep(path), path, quick=False)
    for run in select(plan, only=["ed3_0.01"]):       # that variant and the variants it starts from
        print(run.key, detect(run, plan.eval).state)

Runs are seed-major (every variant of seed 0, then of seed 1, ...), so an interrupted sweep already has
one seed of every variant; within a seed an init_from parent comes before its children. A run dir is
<output_dir>/<variant>/seed<k>. States: finished (latest checkpoint at train.steps and an eval report
for it) -> skipped; needs-eval -> evaluated only; resume (a checkpoint before train.steps) -> relaunched
with --resume; fresh -> trained from the start; conflict (the checkpoint holds another config or more
steps) -> left alone and reported.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from ds_moe_div import rundir
from ds_moe_div.config import ExperimentConfig, load_experiment
from ds_moe_div.config_loader import ConfigError, flatten, to_dict
from ds_moe_div.config_paths import absolute_dict
from ds_moe_div.sweep.config import (
    EvalSpec,
    SweepConfig,
    dependency_order,
    resolve_path,
)

# Keys that may differ between the planned config and a run dir's checkpoint without making it another run.
IGNORED_KEYS = ("train.resume", "train.init_from", "train.show_progress", "train.steps", "train.run_dir",
                "train.resume_from")


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    run_dir: Path  # absolute
    overrides: tuple[str, ...]  # for --override; train.init_from included, train.resume never
    parent: str | None  # key of the run whose weights this one starts from
    config: ExperimentConfig

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    @property
    def steps(self) -> int:
        return self.config.train.steps


@dataclass(frozen=True)
class Plan:
    sweep: SweepConfig
    sweep_file: Path
    quick: bool
    base_config: Path
    deepspeed_config: Path
    output_dir: Path
    eval: EvalSpec
    variants: tuple[str, ...]
    runs: tuple[RunSpec, ...]


class State(enum.Enum):
    FINISHED = "finished"
    NEEDS_EVAL = "needs-eval"
    RESUME = "resume"
    FRESH = "fresh"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class RunStatus:
    state: State
    detail: str
    step: int | None = None  # latest checkpoint step
    report: Path | None = None


def build_plan(sweep: SweepConfig, sweep_file, *, quick: bool = False) -> Plan:
    """Every run of the sweep (or of its --quick version), each with its experiment config loaded."""
    sweep_file = Path(sweep_file).resolve()
    q = sweep.quick
    if quick and q is None:
        raise ConfigError(f"{sweep_file} has no 'quick' section; add one to use --quick")
    base = resolve_path(q.base_config if quick and q.base_config else sweep.base_config, sweep_file)
    output = (q.output_dir if quick and q.output_dir else None) or sweep.output_dir or f"runs/sweeps/{sweep.name}"
    output_dir = (Path(f"{output}-quick") if quick and not q.output_dir else Path(output)).expanduser().resolve()
    variants = _with_parents(sweep, q.variants if quick and q.variants else tuple(sweep.variants))
    seeds = q.seeds if quick else sweep.seeds
    runs = []
    for seed in seeds:
        for name in variants:
            runs.append(_run(sweep, name, seed, base, output_dir, q.overrides if quick else ()))
    return Plan(sweep=sweep, sweep_file=sweep_file, quick=quick, base_config=base,
                deepspeed_config=resolve_path(sweep.deepspeed_config, sweep_file), output_dir=output_dir,
                eval=(q.eval or sweep.eval) if quick else sweep.eval, variants=variants, runs=tuple(runs))


def _with_parents(sweep: SweepConfig, names) -> tuple[str, ...]:
    wanted = set()
    for name in names:
        while name is not None and name not in wanted:
            wanted.add(name)
            name = sweep.variants[name].init_from
    return tuple(n for n in dependency_order(sweep.variants) if n in wanted)


def run_dir_of(output_dir: Path, variant: str, seed: int) -> Path:
    return output_dir / variant / f"seed{seed}"


def _run(sweep: SweepConfig, name: str, seed: int, base: Path, output_dir: Path, quick_overrides) -> RunSpec:
    spec = sweep.variants[name]
    run_dir = run_dir_of(output_dir, name, seed)
    overrides = ["train.show_progress=false", *sweep.base_overrides, *spec.overrides, *quick_overrides]
    overrides = [o.replace("{seed}", str(seed)) for o in overrides]
    overrides += [f"train.seed={seed}", f"train.run_dir={run_dir}"]
    if spec.init_from is not None:
        overrides.append(f"train.init_from={run_dir_of(output_dir, spec.init_from, seed)}")
    try:
        config = load_experiment(base, overrides)
    except ConfigError as e:
        raise ConfigError(f"variant {name!r} (seed {seed}): {e}") from None
    parent = f"{spec.init_from}/seed{seed}" if spec.init_from is not None else None
    return RunSpec(variant=name, seed=seed, run_dir=run_dir, overrides=tuple(overrides), parent=parent,
                   config=config)


def select(plan: Plan, only=None) -> list[RunSpec]:
    """The runs of the variants in `only` (None: all) and of the variants they start from."""
    if not only:
        return list(plan.runs)
    unknown = [v for v in only if v not in plan.variants]
    if unknown:
        raise ConfigError(f"--only names {unknown}, which are not variants of this plan: {list(plan.variants)}")
    wanted = set(_with_parents(plan.sweep, only))
    return [run for run in plan.runs if run.variant in wanted]


def config_differences(run: RunSpec, saved: dict) -> list[str]:
    """Keys whose values differ. A key the saved config lacks counts as its default value: the run was
    written before that setting existed, when it behaved as the default does."""
    # Runs store absolute data paths (config_paths); the plan may name them relative to the cwd.
    planned, saved = flatten(absolute_dict(to_dict(run.config))), flatten(absolute_dict(saved))
    defaults = flatten(to_dict(ExperimentConfig()))
    saved = {k: saved.get(k, defaults.get(k)) for k in set(planned) | set(saved)}
    keys = sorted(set(saved) - set(IGNORED_KEYS))
    return [f"{k}: run dir {saved.get(k)!r}, sweep {planned.get(k)!r}" for k in keys if planned.get(k) != saved.get(k)]


def detect(run: RunSpec, eval_spec: EvalSpec) -> RunStatus:
    step = rundir.latest_step(run.run_dir)
    if step is None:
        return RunStatus(State.FRESH, "no checkpoint")
    try:
        saved = rundir.read_run_config(rundir.latest_tag_dir(run.run_dir))["config"]
    except (rundir.CheckpointError, KeyError, TypeError):
        saved = None
    diffs = config_differences(run, saved) if saved is not None else []
    if diffs:
        return RunStatus(State.CONFLICT, f"its checkpoint was trained with another config ({'; '.join(diffs[:3])}"
                         f"{'; ...' if len(diffs) > 3 else ''}); delete {run.run_dir} or rename the variant", step)
    if step > run.steps:
        return RunStatus(State.CONFLICT, f"its checkpoint is at step {step} > train.steps={run.steps}", step)
    if step < run.steps:
        return RunStatus(State.RESUME, f"checkpoint at step {step} of {run.steps}", step)
    report = rundir.find_report(run.run_dir, split=eval_spec.split, column=eval_spec.domain_column, step=step)
    if report is None:
        return RunStatus(State.NEEDS_EVAL, f"trained ({step} steps), no {eval_spec.split} report", step)
    return RunStatus(State.FINISHED, f"trained ({step} steps) and evaluated", step, report)
