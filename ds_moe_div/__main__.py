import sys

from ds_moe_div.cli import main

sys.exit(main())
