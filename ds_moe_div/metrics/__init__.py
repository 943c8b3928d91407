"""Routing measurements: pure metrics on count matrices (`routing`), the Proposition-1 decomposition on
explicit (sequence, domain) units (`decomposition`), a window accumulator with one batched all-reduce
(`accumulator`), and domain x expert figures (`figures`, imports matplotlib)."""
