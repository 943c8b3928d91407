"""Sweep files load strictly: every shipped sweep (and its --quick version) plans with valid configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_moe_div.config_loader import ConfigError
from ds_moe_div.ds_config import check_ds_config, load_ds_config
from ds_moe_div.sweep.config import dependency_order, load_sweep
from ds_moe_div.sweep.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "ds_configs" / "sweeps").glob("*.json"))
SMOKE = ROOT / "ds_configs" / "experiments" / "smoke.json"
DS_ZERO2 = ROOT / "ds_configs" / "ds_zero2_cpu.json"


# Keys of the balancing baselines (issue 14 item 1) that the baselines sweeps use; on a branch whose
# experiment config lacks them those sweeps are skipped, naming the key, and run once the keys exist.
PENDING_KEYS = ("objectives.balance.method", "objectives.balance.gamma", "objectives.balance.scope")


def plan_or_skip(sweep, path: Path, *, quick: bool = False):
    try:
        return build_plan(sweep, path, quick=quick)
    except (ConfigError, ValueError) as e:
        missing = [key for key in PENDING_KEYS if key in str(e)]
        if missing:
            pytest.skip(f"{path.name}: this config tree does not accept {missing[0]} yet ({e})")
        raise


def write_sweep(tmp_path: Path, **fields) -> Path:
    data = {"name": "t", "base_config": str(SMOKE), "deepspeed_config": str(DS_ZERO2),
            "variants": {"a": [], "b": ["objectives.divergence.coef=0.01"]}, "output_dir": str(tmp_path / "out")}
    data.update(fields)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
@pytest.mark.parametrize("quick", [False, True])
def test_every_shipped_sweep_plans_and_validates(path, quick):
    sweep = load_sweep(path)
    assert sweep.quick is not None, f"{path.name} needs a quick section (CI runs it)"
    plan = plan_or_skip(sweep, path, quick=quick)
    ds = load_ds_config(plan.deepspeed_config)
    for run in plan.runs:
        check_ds_config(ds, run.config, world_size=sweep.num_ranks, on_cpu=True)
        assert run.config.train.seed == run.seed and Path(run.config.train.run_dir) == run.run_dir
    if quick:
        assert len(plan.runs) <= 3 and all(r.steps <= 30 for r in plan.runs)
        assert all(r.config.data.corpus == "fixture" for r in plan.runs)


def test_shipped_objectives_sweep_has_the_issue_variants():
    sweep = load_sweep(ROOT / "ds_configs" / "sweeps" / "objectives.json")
    plan = build_plan(sweep, ROOT / "ds_configs" / "sweeps" / "objectives.json")
    configs = {r.variant: r.config for r in plan.runs if r.seed == sweep.seeds[0]}
    base = configs["baseline"].objectives
    assert base.divergence.coef == base.orthogonality.coef == base.variance.coef == base.z_loss.coef == 0
    assert configs["ed49_0.01"].data.domain_column == "subdomain"
    shuffled = [r.config.data.shuffle_labels_seed for r in plan.runs if r.variant == "ed3_shuffled_0.01"]
    assert shuffled == list(sweep.seeds)  # "{seed}": one label permutation per seed
    assert configs["all"].objectives.divergence.coef > 0 and configs["all"].objectives.variance.coef > 0


def test_shipped_posttrain_sweep_starts_from_the_pretrained_run():
    path = ROOT / "ds_configs" / "sweeps" / "posttrain_math.json"
    plan = build_plan(load_sweep(path), path)
    for run in plan.runs:
        if run.parent is None:
            assert run.config.data.include_labels == ()
            continue
        parent = next(r for r in plan.runs if r.key == run.parent)
        assert Path(run.config.train.init_from) == parent.run_dir and parent.seed == run.seed
        assert run.config.data.include_labels == ("math",)
        assert run.config.data.tokenizer == parent.config.data.tokenizer  # same token ids
        assert plan.runs.index(parent) < plan.runs.index(run)


def test_short_and_long_variant_forms(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, variants={"a": ["train.steps=3"], "b": {"overrides": [], "init_from": "a"}}))
    assert sweep.variants["a"].overrides == ("train.steps=3",) and sweep.variants["b"].init_from == "a"
    assert sweep.reference_variant == "a"


@pytest.mark.parametrize(("fields", "message"), [
    ({"variantz": {}}, "unknown key 'variantz'; did you mean 'variants'"),
    ({"eval": {"splitt": "test"}}, "unknown key 'eval.splitt'; did you mean 'eval.split'"),
    ({"variants": {"a": {"overides": []}}}, "unknown key 'variants.a.overides'; did you mean 'variants.a.overrides'"),
    ({"variants": {"a": ["train.steps"]}}, "variants.a: overrides: malformed override 'train.steps'"),
    ({"variants": {"a": ["train.seed=3"]}}, "train.seed is set by the sweep"),
    ({"variants": {"a": {"init_from": "zz"}}}, "variants.a.init_from='zz' is not a variant"),
    ({"variants": {"a": {"init_from": "b"}, "b": {"init_from": "a"}}}, "init_from forms a cycle: a -> b -> a"),
    ({"variants": {"bad/name": []}}, "variant name 'bad/name'"),
    ({"seeds": [0, 0]}, "seeds must be distinct"),
    ({"num_ranks": 0}, "num_ranks=0"),
    ({"quick": {"variants": ["c"]}}, r"quick.variants names unknown variants \['c'\]"),
    ({"eval": {"split": "dev"}}, "'eval.split' must be one of"),
    ({"reference": "c"}, "reference='c' is not a variant"),
])
def test_bad_sweep_files_name_the_key(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, **fields))


def test_missing_base_config_and_bad_variant_override_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="file 'nope.json' not found; looked in"):
        build_plan(load_sweep(write_sweep(tmp_path, base_config="nope.json")), tmp_path / "sweep.json")
    path = write_sweep(tmp_path, variants={"a": ["objectives.divergence.cof=0.1"]})
    with pytest.raises(ConfigError, match=r"variant 'a' \(seed 0\).*did you mean 'objectives.divergence.coef'"):
        build_plan(load_sweep(path), path)
    with pytest.raises(ConfigError, match="has no 'quick' section"):
        build_plan(load_sweep(path), path, quick=True)


def test_dependency_order_puts_parents_first():
    from ds_moe_div.sweep.config import VariantSpec

    variants = {"ft": VariantSpec(init_from="mid"), "base": VariantSpec(), "mid": VariantSpec(init_from="base"),
                "other": VariantSpec()}
    assert dependency_order(variants) == ["base", "mid", "ft", "other"]


CONFIRMATORY = sorted(p for p in SWEEPS if p.stem.startswith("confirm_"))


@pytest.mark.parametrize("path", CONFIRMATORY, ids=[p.stem for p in CONFIRMATORY])
def test_confirmatory_sweeps_use_the_preregistered_settings(path):
    """Fresh seeds (none of the exploratory 0-2, none shared between hypotheses' families unless the file
    shares an output_dir on purpose), the whole test split, global-batch balance at 1e-3 in the reference
    arm, capacity >= 2, mixed packing, a global batch >= 64 sequences, declared contrasts and endpoints."""
    if missing_prerequisites(path.stem):
        data = json.loads(path.read_text())  # not loadable yet: check what the raw file says
        assert not set(data["seeds"]) & {0, 1, 2} and min(data["seeds"]) > 1000
        assert "max_batches" not in data["eval"] and data["contrasts"] and data["endpoints"][0] == "lm_loss"
        return
    sweep = load_sweep(path)
    assert not set(sweep.seeds) & {0, 1, 2} and min(sweep.seeds) > 1000
    assert sweep.eval.max_batches is None and sweep.contrasts and sweep.endpoints[0] == "lm_loss"
    plan = build_plan(sweep, path)
    ds = load_ds_config(plan.deepspeed_config)
    for run in plan.runs:
        micro, gas = check_ds_config(ds, run.config, world_size=sweep.num_ranks, on_cpu=True)
        assert micro * gas * sweep.num_ranks >= 64
        assert run.config.data.packing == "mixed"
        # no token dropped: every confirmatory model runs AutoEP's dropless layer (PREREGISTRATION, deviation 1)
        assert run.config.model.uses_autoep
        if run.variant == sweep.reference_variant or run.variant in ("baseline", "pretrain"):
            balance = run.config.objectives.balance
            assert balance.scope == "global_batch" and balance.coef == pytest.approx(1e-3)


def test_posttrain_dose_sweep_has_the_doses_and_the_cosine_control_arm():
    path = ROOT / "ds_configs" / "sweeps" / "confirm_posttrain_dose.json"
    arms = {run.variant: (run.config.objectives.orthogonality.form, run.config.objectives.orthogonality.coef)
            for run in build_plan(load_sweep(path), path).runs}
    assert arms == {"pretrain": ("pairwise", 0.0), "ft_aux": ("pairwise", 0.0), "ft_orth_0.003": ("pairwise", 0.003),
                    "ft_orth_0.03": ("pairwise", 0.03), "ft_orth_cosine_0.01": ("cosine", 0.01)}


def test_confirmatory_seed_blocks_do_not_overlap():
    blocks = {}
    for path in CONFIRMATORY:
        data = json.loads(path.read_text())
        blocks.setdefault(data["output_dir"], set()).update(data["seeds"])
    dirs = list(blocks)
    for i, a in enumerate(dirs):
        for b in dirs[i + 1:]:
            assert not blocks[a] & blocks[b], f"{a} and {b} share seeds"


# Confirmatory sweeps written before the settings they use exist (docs/PREREGISTRATION.md): each entry is
# (experiment-config key, a value it must accept) or ("file", path). While one is missing the file's test is
# skipped, naming it; once it exists the file is planned and validated like every other.
PENDING = {
    "confirm_paper_setting": [("objectives.balance.method", "aux"), ("sweep", "eval.args"),
                              ("file", "ds_configs/experiments/posttrain_lora.json")],
}


def missing_prerequisites(name: str) -> list[str]:
    from ds_moe_div.config import load_experiment

    missing = []
    for key, value in PENDING.get(name, ()):
        if key == "file":
            if not (ROOT / value).is_file():
                missing.append(f"{value} (the pretrained-MoE issue's experiment config)")
            continue
        if key == "sweep":
            from dataclasses import fields

            from ds_moe_div.sweep.config import EvalSpec

            name = value.split(".", 1)[1]
            if name not in {f.name for f in fields(EvalSpec)}:
                missing.append(f"the sweep key {value} (not in ds_moe_div/sweep/config.py yet)")
            continue
        try:
            load_experiment(None, [f"{key}={value}"])
        except (ConfigError, ValueError):
            missing.append(f"{key}={value!r} (not in the experiment config yet)")
    return missing


@pytest.fixture(autouse=True)
def _skip_sweeps_awaiting_settings(request):
    """test_every_shipped_sweep_plans_and_validates skips a sweep whose PENDING settings are not merged yet,
    naming them (an autouse fixture, so that the shipped-sweep test itself stays as it is)."""
    if request.node.originalname != "test_every_shipped_sweep_plans_and_validates":
        return
    path = request.node.callspec.params["path"]
    missing = missing_prerequisites(path.stem)
    if missing:
        pytest.skip(f"{path.name} needs " + "; ".join(missing))
