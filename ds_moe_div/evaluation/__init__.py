"""Evaluation of checkpoints on held-out text (no side effects on import; matplotlib loads lazily).

    python -m ds_moe_div eval --run-dir runs/tiny                      # report.json + report.md + PNGs
    deepspeed --num_gpus 2 scripts/evaluate.py --run-dir runs/tiny      # the same on 2 ranks
    python -m ds_moe_div compare runs/baseline runs/ed_0.01 --names base ed

Modules: heldout (nll sums per domain, one all-reduce per pass; also used by training-time eval),
permutation (router-permutation delta-PPL), loading (checkpoint -> eval engine), relabel (another label
scheme on the same held-out sequences), plots (figures, TensorBoard), report (report.json / report.md),
runner (the `eval` command), compare (the `compare` command).
"""
