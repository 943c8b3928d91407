"""Tests for ds_moe_div.config_loader against a toy schema (the real schema lives elsewhere)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from ds_moe_div.config_loader import (
    ConfigError,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    load_file,
    to_dict,
)


@dataclass(frozen=True)
class ModelConfig:
    num_experts: int = 8
    ep_size: int = 1
    k: Literal[1, 2] = 1
    capacity_factor: float = 1.0
    noisy_gate_policy: Optional[Literal["Jitter", "RSample"]] = None  # noqa: UP045 (tests typing.Optional)

    def __post_init__(self):
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by "
                             f"ep_size={self.ep_size}; pick ep_size dividing num_experts")


@dataclass(frozen=True)
class LossConfig:
    l_aux_coef: float = 0.01
    domain_coefs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    path: Path
    domains: tuple[str, ...] = ("code", "web")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    lr: float | Literal["auto"] = "auto"
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    debug: bool = False
    run_name: str | None = None
    _cache_key: str = ""
    num_params: int = field(default=0, init=False)

    def __post_init__(self):
        if self.lr != "auto" and self.lr <= 0:
            raise ValueError(f"lr must be positive or 'auto', got {self.lr}")


@dataclass
class MutableConfig:
    x: int = 0


@dataclass(frozen=True)
class ListConfig:
    xs: list[int] = field(default_factory=list)


FULL = {
    "data": {"path": "corpus/shards", "domains": ["code", "math", "web"]},
    "model": {"num_experts": 16, "ep_size": 4, "k": 2, "capacity_factor": 2,
              "noisy_gate_policy": "RSample"},
    "loss": {"l_aux_coef": 0.1, "domain_coefs": {"code": 1, "web": 0.5}},
    "lr": 3,
    "betas": [0.9, 0.95],
    "seed": 7,
    "debug": True,
    "run_name": "baseline",
}


def with_key(dotted: str, value) -> dict:
    """A deep copy of FULL with one dotted key set."""
    data = json.loads(json.dumps(FULL))
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def error_of(data, cls=ExperimentConfig) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    return str(info.value)


# --- building ------------------------------------------------------------------------------


def test_full_config_builds_with_converted_types():
    cfg = from_dict(ExperimentConfig, FULL)
    assert cfg.data.path == Path("corpus/shards")
    assert cfg.data.domains == ("code", "math", "web")
    assert cfg.model == ModelConfig(16, 4, 2, 2.0, "RSample")
    assert type(cfg.model.capacity_factor) is float and type(cfg.lr) is float
    assert cfg.loss.domain_coefs == {"code": 1.0, "web": 0.5}
    assert type(cfg.loss.domain_coefs["code"]) is float
    assert cfg.betas == (0.9, 0.95) and cfg.seed == 7 and cfg.debug is True


def test_defaults_fill_missing_optional_keys():
    cfg = from_dict(ExperimentConfig, {"data": {"path": "d"}})
    assert cfg.model == ModelConfig() and cfg.loss == LossConfig()
    assert cfg.lr == "auto" and cfg.run_name is None and cfg.data.domains == ("code", "web")


def test_null_accepted_for_optional_fields():
    cfg = from_dict(ExperimentConfig, with_key("model.noisy_gate_policy", None))
    assert cfg.model.noisy_gate_policy is None
    assert from_dict(ExperimentConfig, with_key("run_name", None)).run_name is None


def test_result_is_frozen_at_every_level():
    cfg = from_dict(ExperimentConfig, FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_experts = 2
    assert isinstance(cfg.data.domains, tuple)


def test_non_frozen_schema_is_rejected():
    with pytest.raises(TypeError, match="frozen=True"):
        from_dict(MutableConfig, {})


def test_unsupported_annotation_is_a_schema_error():
    with pytest.raises(TypeError, match="does not support"):
        from_dict(ListConfig, {"xs": [1]})


# --- keys ----------------------------------------------------------------------------------


def test_unknown_key_names_dotted_path_and_nearest_field():
    data = with_key("model.num_expert", 8)
    assert "unknown key 'model.num_expert'; did you mean 'model.num_experts'?" in error_of(data)


def test_unknown_top_level_key_suggests_nearest():
    assert "unknown key 'sed'; did you mean 'seed'?" in error_of(with_key("sed", 1))


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = error_of(with_key("loss.zzz", 1))
    assert "unknown key 'loss.zzz'" in msg and "did you mean" not in msg
    assert "'l_aux_coef', 'domain_coefs'" in msg


def test_comment_keys_are_ignored_at_every_level():
    data = with_key("_comment", "top note")
    data["#"] = "hash note"
    data["model"]["_comment_k"] = "why k=2"
    data["model"]["# ep"] = "why ep=4"
    assert from_dict(ExperimentConfig, data) == from_dict(ExperimentConfig, FULL)


def test_bare_comment_key_is_not_ignored():
    assert "unknown key 'model.comment'" in error_of(with_key("model.comment", "x"))


@pytest.mark.parametrize("key", ["_cache_key", "num_params"])
def test_private_and_init_false_fields_are_not_loadable(key):
    msg = error_of(with_key(key, 1))
    assert f"'{key}' is internal to ExperimentConfig" in msg


def test_missing_required_top_level_field():
    msg = error_of({})
    assert "missing required key 'data' (DataConfig)" in msg and "--override data=" in msg


def test_missing_required_nested_field():
    msg = error_of({"data": {}})
    assert "missing required key 'data.path' (Path)" in msg
    assert "--override data.path=<value>" in msg


def test_non_string_key_is_rejected():
    assert "key 1 in 'model' must be a string" in error_of(with_key("model", {1: 2}))


# --- types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dotted, value, expected", [
    ("model.num_experts", "8", "'model.num_experts' must be int; got str '8'"),
    ("model.num_experts", True, "'model.num_experts' must be int; got bool True"),
    ("model.num_experts", 8.0, "'model.num_experts' must be int; got float 8.0"),
    ("model.capacity_factor", True, "'model.capacity_factor' must be float; got bool"),
    ("model.capacity_factor", "big", "'model.capacity_factor' must be float; got str"),
    ("debug", 1, "'debug' must be bool; got int 1"),
    ("debug", "true", "'debug' must be bool; got str 'true'"),
    ("run_name", 3, "'run_name' must be str; got int 3"),
    ("model.k", 3, "'model.k' must be one of 1, 2; got int 3"),
    ("model.k", True, "'model.k' must be one of 1, 2; got bool True"),
    ("model.noisy_gate_policy", "jitter", "must be one of 'Jitter', 'RSample'; got str 'jitter'"),
    ("lr", "autp", "'lr' must be float or one of 'auto'; got str 'autp'"),
    ("lr", None, "'lr' must be float or one of 'auto'; got NoneType None"),
    ("data.domains", "code", "'data.domains' must be a list"),
    ("data.domains", ["code", 1], "'data.domains[1]' must be str; got int 1"),
    ("data.path", 3, "'data.path' must be Path; got int 3"),
    ("betas", [0.9], "'betas' must have 2 items; got 1"),
    ("betas", [0.9, "x"], "'betas[1]' must be float"),
    ("loss.domain_coefs", {"code": "x"}, "'loss.domain_coefs.code' must be float; got str"),
    ("loss.domain_coefs", [1], "'loss.domain_coefs' must be an object"),
    ("model", 3, "'model' must be an object (ModelConfig); got int 3"),
    ("model", None, "'model' must be an object (ModelConfig)"),
])
def test_type_errors_name_dotted_path_and_expected_type(dotted, value, expected):
    assert expected in error_of(with_key(dotted, value))


def test_yaml_style_exponent_string_gets_a_hint():
    msg = error_of(with_key("loss.l_aux_coef", "1e-3"))
    assert "'loss.l_aux_coef' must be float" in msg and "write 1.0e-3" in msg


def test_union_accepts_each_member():
    assert from_dict(ExperimentConfig, with_key("lr", "auto")).lr == "auto"
    assert from_dict(ExperimentConfig, with_key("lr", 1e-4)).lr == 1e-4


def test_top_level_must_be_a_mapping():
    assert "the top level must be an object (ExperimentConfig); got list" in error_of([1])


# --- __post_init__ -------------------------------------------------------------------------


def test_post_init_error_is_prefixed_with_dotted_path():
    msg = error_of(with_key("model.num_experts", 6))
    assert msg.startswith("model: num_experts=6 is not divisible by ep_size=4")


def test_post_init_error_at_top_level_names_the_class():
    msg = error_of(with_key("lr", -1))
    assert msg.startswith("ExperimentConfig: lr must be positive")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- to_dict / dump ------------------------------------------------------------------------


def test_to_dict_is_json_ready_and_round_trips():
    cfg = from_dict(ExperimentConfig, FULL)
    plain = to_dict(cfg)
    assert plain["data"] == {"path": "corpus/shards", "domains": ["code", "math", "web"]}
    assert plain["betas"] == [0.9, 0.95]
    assert "_cache_key" not in plain and "num_params" not in plain
    assert from_dict(ExperimentConfig, json.loads(json.dumps(plain))) == cfg


def test_to_dict_rejects_non_dataclass():
    with pytest.raises(TypeError):
        to_dict({"a": 1})


def test_dump_config_round_trips_and_leaves_no_temp_files(tmp_path):
    cfg = from_dict(ExperimentConfig, FULL)
    out = tmp_path / "run" / "config.json"
    dump_config(cfg, out)
    assert load_config(ExperimentConfig, out) == cfg
    assert json.loads(out.read_text()) == to_dict(cfg)
    assert out.read_text().startswith('{\n  "data"')
    assert [p.name for p in out.parent.iterdir()] == ["config.json"]


def test_dump_config_replaces_existing_file(tmp_path):
    out = tmp_path / "config.json"
    out.write_text("old")
    dump_config(from_dict(ExperimentConfig, FULL), out)
    assert json.loads(out.read_text())["seed"] == 7


# --- files ---------------------------------------------------------------------------------


YAML_TEXT = """\
# YAML comments are fine too
data:
  path: corpus/shards
  domains: [code, math, web]
model:
  num_experts: 16
  ep_size: 4
  k: 2
  capacity_factor: 2
  noisy_gate_policy: RSample
loss:
  l_aux_coef: 0.1
  domain_coefs: {code: 1, web: 0.5}
lr: 3
betas: [0.9, 0.95]
seed: 7
debug: true
run_name: baseline
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_and_json_files_load_the_same_config(tmp_path, suffix):
    yaml_path = tmp_path / f"c{suffix}"
    yaml_path.write_text(YAML_TEXT)
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps(FULL, indent=2))
    assert load_file(yaml_path) == load_file(json_path) == FULL
    assert load_config(ExperimentConfig, yaml_path) == from_dict(ExperimentConfig, FULL)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.json' not found; check the path"):
        load_file(tmp_path / "nope.json")


def test_json_parse_error_has_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "seed": 1,\n  "debug": tru\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json:3:12: invalid JSON"):
        load_file(path)


def test_yaml_parse_error_has_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nmodel: [1, 2\ndebug: true\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_file(path)


@pytest.mark.parametrize("name, text", [("list.json", "[1, 2]"), ("list.yaml", "- 1\n- 2\n"),
                                        ("empty.yaml", ""), ("scalar.json", "3")])
def test_top_level_must_be_an_object(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="the top level must be an object"):
        load_file(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("seed = 1\n")
    with pytest.raises(ConfigError, match=r"must end in \.json, \.yaml or \.yml"):
        load_file(path)


# --- overrides -----------------------------------------------------------------------------


def test_override_sets_nested_key():
    assert apply_overrides(FULL, ["model.num_experts=32"])["model"]["num_experts"] == 32


@pytest.mark.parametrize("raw, value", [
    ("8", 8), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("false", False), ("null", None),
    ("[1, 2]", [1, 2]), ('{"a": 1}', {"a": 1}), ('"8"', "8"), ('"true"', "true"),
])
def test_override_values_parse_as_json(raw, value):
    assert apply_overrides({}, [f"x={raw}"])["x"] == value


@pytest.mark.parametrize("raw", ["adam", "runs/exp 1", "a=b", "", "[1, 2"])
def test_override_values_fall_back_to_raw_string(raw):
    assert apply_overrides({}, [f"x={raw}"])["x"] == raw


def test_override_creates_missing_levels():
    assert apply_overrides({"seed": 1}, ["a.b.c=3"]) == {"seed": 1, "a": {"b": {"c": 3}}}


def test_override_replaces_null_level_with_object():
    assert apply_overrides({"a": None}, ["a.b=1"]) == {"a": {"b": 1}}


def test_later_override_wins():
    assert apply_overrides({}, ["seed=1", "seed=2"]) == {"seed": 2}


def test_overrides_do_not_mutate_input():
    snapshot = json.loads(json.dumps(FULL))
    apply_overrides(FULL, ["model.k=1", "data.domains=[]", "new.key=1"])
    assert FULL == snapshot


@pytest.mark.parametrize("bad", ["model.num_experts", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match=r"malformed override .*'a\.b\.c=value'"):
        apply_overrides({}, [bad])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"'model\.k' is int 2, not an object"):
        apply_overrides(FULL, ["model.k.x=1"])


def test_load_config_applies_overrides_over_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(FULL))
    cfg = load_config(ExperimentConfig, path, ["model.ep_size=8", "run_name=ablation", "lr=auto"])
    assert cfg.model.ep_size == 8 and cfg.run_name == "ablation" and cfg.lr == "auto"


def test_load_config_without_file_uses_overrides_only():
    cfg = load_config(ExperimentConfig, None, ["data.path=/d", "data.domains=[\"x\"]"])
    assert cfg.data == DataConfig(Path("/d"), ("x",))


def test_unknown_override_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.num_expert'; did you mean "
                                          r"'model\.num_experts'\?"):
        load_config(ExperimentConfig, None, ["data.path=d", "model.num_expert=8"])


def test_override_with_wrong_type_names_path():
    with pytest.raises(ConfigError, match=r"'debug' must be bool; got str 'yes'"):
        load_config(ExperimentConfig, None, ["data.path=d", "debug=yes"])
