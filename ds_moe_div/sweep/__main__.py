"""python -m ds_moe_div sweep SWEEP.json [--quick] [--dry-run] [--only VARIANT ...]"""
import sys

from ds_moe_div.sweep.cli import main

sys.exit(main())
