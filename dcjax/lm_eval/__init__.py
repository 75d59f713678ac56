"""lm-evaluation-harness integration: the model "dcjax" (docs/lm_eval.md).

Importing this package registers the model with lm-eval (`pip install -e '.[lm_eval]'`).
lm-eval 0.4.x discovers no third-party models by itself (no entry-point group), so run it
through this package, which registers the model and then calls lm-eval's own CLI:

  python -m dcjax.lm_eval --model dcjax --model_args checkpoint=W[:step],steps=64 --tasks ...
  dcjax-lm-eval --model dcjax ...          (the same, as an installed console script)

From Python: `import dcjax.lm_eval` and then `lm_eval.simple_evaluate(model="dcjax", ...)`.
"""

try:
  import lm_eval  # noqa: F401  pylint: disable=unused-import
except ImportError as e:  # pragma: no cover
  raise ImportError("dcjax.lm_eval needs lm-eval: pip install -e '.[lm_eval]'") from e

from dcjax.lm_eval.model import DcjaxLM  # registers "dcjax"

__all__ = ["DcjaxLM"]
