"""Routing measurements: pure metrics on count matrices (`routing`), a window accumulator with one
batched all-reduce (`accumulator`), and domain x expert figures (`figures`, imports matplotlib)."""
