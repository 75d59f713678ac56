"""`mode="eval"`: HumanEval / MBPP / EvalPlus pass@k with the sampler as the generator
(docs/evaluation.md)."""

from __future__ import annotations

from typing import Any

from dcjax import workdir as workdir_lib
from dcjax.eval.runner import run_eval, validate  # noqa: F401 (validate: the mode's hook)
from dcjax.eval.sampler_fn import make_generate_fn
from dcjax.parallel import mesh as mesh_lib


def run(config: Any, workdir: Any) -> None:
  mesh = mesh_lib.make_mesh(config.mesh)
  run_eval(config, make_generate_fn(config, mesh), workdir=workdir_lib.resolve(workdir).local)
