"""Test-session environment, inherited by every subprocess and launcher the tests start.

DeepSpeed JIT-compiles its ops into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, shared by
every venv, whatever its torch build). Inside a venv the tests use the venv's own folder, as
scripts/test.sh does, unless the variable is already set.
"""

import os
import sys

if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
