"""Test-session environment, inherited by every subprocess and launcher the tests start.

DeepSpeed JIT-compiles its ops into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, shared by
every venv, whatever its torch build). Inside a venv the tests use the venv's own folder, as
scripts/test.sh does, unless the variable is already set.
"""

import os
import sys

import pytest

if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


@pytest.fixture(scope="session")
def smoke_reference(tmp_path_factory):
    """One uninterrupted 2-rank launcher run of ds_configs/experiments/smoke.json (6 steps, checkpoints at
    3 and 6, logged every step), shared by tests/test_training.py and tests/test_faults.py: (run dir, stdout)."""
    from tests.test_training import launch

    tmp = tmp_path_factory.mktemp("smoke")
    result = launch(tmp, "train.run_dir=run", "train.log_interval=1", "train.show_progress=true")
    assert result.returncode == 0, result.stdout[-6000:]
    return tmp / "run", result.stdout
