"""lm-eval on our model in memory: `DsMoeLM`, an `lm_eval.api.model.LM`, and `run_lm_eval`.

    lm = DsMoeLM(scorer)                                    # scorer: scoring.ModelScorer
    results = run_lm_eval(lm, ["arc_easy", "mmlu"], limit=100)   # lm_eval.simple_evaluate, the usual way
    results = run_lm_eval(lm, ["ds_moe_div_cloze_code"], include_path=tasks_dir)   # cloze.write_lm_eval_tasks

lm-eval is optional (`pip install -e .[eval]`): importing this module without it raises an ImportError
that names the install command. Task data (ARC, MMLU, GSM8K, ...) comes from the Hugging Face hub through
lm-eval's own loaders, as for any lm-eval run; offline, only local tasks (include_path) work.
loglikelihood / loglikelihood_rolling are scoring.ModelScorer's (lm-eval's semantics); generate_until is
greedy unless the request asks for sampling (do_sample / temperature > 0), stops at <|eos|>, at any of the
request's `until` strings, or after `max_gen_toks` tokens (default 256).
"""
from __future__ import annotations

from collections.abc import Sequence

from ds_moe_div.evaluation.generation import generate

INSTALL_HINT = "lm-eval is not installed: pip install -e .[eval] (or pip install lm-eval)"

try:
    from lm_eval.api.model import LM
except ImportError as e:  # pragma: no cover - exercised where lm-eval is absent
    raise ImportError(INSTALL_HINT) from e

DEFAULT_MAX_GEN_TOKS = 256


class DsMoeLM(LM):
    """lm-eval's model interface over a scoring.ModelScorer (one process)."""

    def __init__(self, scorer, *, seed: int = 0) -> None:
        super().__init__()
        self.scorer, self.seed = scorer, seed

    @property
    def tokenizer_name(self) -> str:
        return "ds_moe_div"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for i, request in enumerate(requests):
            context, kwargs = request.args[0], dict(request.args[1] if len(request.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False)) or float(kwargs.get("temperature", 0.0) or 0.0) > 0
            temperature = float(kwargs.get("temperature", 1.0) or 1.0) if sample else 0.0
            result = generate(self.scorer, context, max_new_tokens=int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
                              temperature=temperature, top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                              seed=self.seed + i, stop=until)
            out.append(result.text)
        return out


def run_lm_eval(lm: DsMoeLM, tasks: Sequence[str], *, include_path=None, limit: float | None = None,
                num_fewshot: int | None = None, seed: int = 0) -> dict:
    """lm_eval.simple_evaluate on `lm`; returns its "results" ({task: {"acc,none": ..., ...}})."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:
        evaluated = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                            num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                            numpy_random_seed=seed, torch_random_seed=seed,
                                            fewshot_random_seed=seed)
    except KeyError as e:
        raise ValueError(f"lm-eval does not know a task of {list(tasks)}: {e}. Names as in `lm_eval --tasks list`; "
                         "task YAMLs of your own: --lm-eval-include-path DIR") from e
    except (ConnectionError, OSError) as e:
        raise ValueError(f"lm-eval could not load the data of {list(tasks)} ({type(e).__name__}: {e}); it comes from "
                         "the Hugging Face hub (or HF_DATASETS_CACHE); offline, use local task YAMLs "
                         "(--lm-eval-include-path DIR)") from e
    if evaluated is None:
        raise RuntimeError("lm_eval.simple_evaluate returned nothing (not the main rank?)")
    return evaluated["results"]


def metrics_of(results: dict) -> dict[str, dict[str, float | None]]:
    """{task: {metric: value}} from lm-eval's results ("acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr")."""
    out = {}
    for task, entry in results.items():
        metrics = {}
        for key, value in entry.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and _filter:
                metrics[name] = float(value)
            elif value == "N/A" and _filter:
                metrics[name] = None
        out[task] = metrics
    return out
