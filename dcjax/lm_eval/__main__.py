"""`python -m dcjax.lm_eval ...` = `lm_eval ...` with the model "dcjax" registered."""

from lm_eval.__main__ import cli_evaluate

import dcjax.lm_eval  # noqa: F401  pylint: disable=unused-import  (registers "dcjax")


def main() -> None:
  cli_evaluate()


if __name__ == "__main__":
  main()
