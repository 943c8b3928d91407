"""ds_moe_div: DeepSpeed-MoE training for expert specialisation.

Import has no side effects: no process groups, writers or globals are created here.
"""

__version__ = "0.1.0"
