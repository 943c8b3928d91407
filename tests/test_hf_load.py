"""Loading a local Hugging Face checkpoint: every refusal happens before a weight is read, and names the fix."""
from __future__ import annotations

import json
import shutil

import pytest

from ds_moe_div.hf import load
from ds_moe_div.hf.families import FAMILIES, SUPPORTED, UnsupportedModelError, family_of
from ds_moe_div.hf.load import PretrainedLoadError, check_checkpoint, load_pretrained, read_config
from tests import hf_fixtures

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def copy_of(tiny_dirs, tmp_path):
    def make(family):
        return shutil.copytree(tiny_dirs[family], tmp_path / family)
    return make


def test_six_families_with_their_facts():
    assert SUPPORTED == ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
    assert FAMILIES["olmoe"].autoep_preset is None  # not a DeepSpeed preset: custom pattern keys
    block = FAMILIES["olmoe"].autoep_block(ep_size=2, config=type("C", (), {"norm_topk_prob": True})())
    assert block["moe_layer_pattern"] == r"model\.layers\.\d+\.mlp" and block["route_norm"] is True
    assert FAMILIES["qwen2_moe"].autoep_block(ep_size=1)["preset_model"] == "qwen3_moe"
    assert FAMILIES["deepseek_v3"].score_func == "sigmoid"


def test_unsupported_model_type_refused_before_weights(copy_of, monkeypatch):
    root = copy_of("mixtral")
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_oss"}))
    monkeypatch.setattr(load, "shard_files", lambda *a: pytest.fail("weights were looked at"))
    with pytest.raises(UnsupportedModelError, match="gpt_oss.*mixtral, qwen2_moe, olmoe, qwen3_moe, deepseek_v2"):
        load_pretrained(root)
    with pytest.raises(UnsupportedModelError):
        family_of({"model_type": "llama"})


def test_missing_config_and_missing_weights(tmp_path, copy_of):
    with pytest.raises(PretrainedLoadError, match="no config.json"):
        read_config(tmp_path)
    root = copy_of("olmoe")
    for f in root.glob("model*.safetensors*"):
        f.unlink()
    config, family = read_config(root)
    with pytest.raises(PretrainedLoadError, match="only safetensors"):
        check_checkpoint(root, config, family)


def test_missing_shard_named_in_index(copy_of):
    root = copy_of("qwen3_moe")
    shard = sorted(root.glob("model-*.safetensors"))[1]
    shard.unlink()
    config, family = read_config(root)
    with pytest.raises(PretrainedLoadError, match=f"{shard.name}.*missing"):
        check_checkpoint(root, config, family)


def test_truncated_safetensors(copy_of):
    root = copy_of("deepseek_v2")
    shard = min(root.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(PretrainedLoadError, match="truncated"):
        load_pretrained(root)
    shard.write_bytes(b"\x00\x01")
    with pytest.raises(PretrainedLoadError, match="truncated"):
        load_pretrained(root)


def test_shape_mismatch_vs_config(copy_of):
    root = copy_of("qwen2_moe")
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": cfg["moe_intermediate_size"] * 2}))
    with pytest.raises(PretrainedLoadError, match=r"experts\.\d+\.(gate|up|down)_proj.*shape"):
        load_pretrained(root)


def test_fewer_experts_in_config_than_on_disk(copy_of):
    root = copy_of("mixtral")
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 4}))
    with pytest.raises(PretrainedLoadError, match="names expert [4-7]"):
        load_pretrained(root)


def test_num_experts_not_divisible_by_ep_size(tiny_dirs):
    with pytest.raises(PretrainedLoadError, match="num_experts=8 is not divisible by ep_size=3"):
        load_pretrained(tiny_dirs["olmoe"], ep_size=3)


def test_good_checkpoint_loads_with_its_tokenizer(tiny_dirs):
    model = load_pretrained(tiny_dirs["deepseek_v3"], ep_size=2)
    tok = load.load_tokenizer(tiny_dirs["deepseek_v3"])
    assert len(tok) == model.config.vocab_size and tok.eos_token == "<|eos|>"


def test_make_tiny_hf_script_writes_a_loadable_model_and_refuses_a_non_empty_dir(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_hf.py"
    out = tmp_path / "m"
    cmd = [sys.executable, str(script), "--family", "qwen3_moe", "--out", str(out)]
    assert subprocess.run(cmd, check=False, capture_output=True, timeout=300).returncode == 0
    assert load_pretrained(out).config.model_type == "qwen3_moe"
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not empty" in again.stderr
