"""python -m ds_moe_div prepare-corpus --out DIR [--mb-per-subdomain X] [--tier lite|full]"""

from ds_moe_div.corpus.cli import main

raise SystemExit(main())
