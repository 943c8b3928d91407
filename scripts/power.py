"""Sample size of a paired comparison from a measured sd (docs/PREREGISTRATION.md regenerates its numbers
with this script).

    python scripts/power.py --sd 0.029 --target 0.03 --family 4     # n for MDE 0.03 at alpha 0.05/4
    python scripts/power.py --sd 0.029 --n 5 8 10                   # MDE at these n

MDE(n) = (t_{1-a/2, n-1} + t_{power, n-1}) * sd / sqrt(n), the central-t approximation of a two-sided paired
t test (ds_moe_div/stats.py), with a = alpha / family: the Bonferroni bound, which is what the smallest p of a
Holm family must beat.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_moe_div import stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", type=float, required=True, help="sd of the paired differences (nats)")
    parser.add_argument("--target", type=float, help="the MDE to reach (nats)")
    parser.add_argument("--n", type=int, nargs="*", default=[3, 5, 8, 10, 13], help="report the MDE at these n")
    parser.add_argument("--family", type=int, default=1, help="tests in the Holm family (alpha is divided by it)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--power", type=float, default=0.8)
    args = parser.parse_args(argv)
    if args.sd <= 0 or args.family < 1:
        parser.error("--sd must be > 0 and --family >= 1")
    alpha = args.alpha / args.family
    print(f"sd {args.sd:g}, two-sided alpha {args.alpha:g}/{args.family} = {alpha:.4g}, power {args.power:g}")
    for n in args.n:
        print(f"  n = {n:3d}: MDE {stats.mde(sd=args.sd, n=n, alpha=alpha, power=args.power):.4g}")
    if args.target is not None:
        n = stats.n_for_mde(sd=args.sd, target=args.target, alpha=alpha, power=args.power)
        print(f"n for MDE {args.target:g}: {n} (MDE at n = {stats.mde(sd=args.sd, n=n, alpha=alpha, power=args.power):.4g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
