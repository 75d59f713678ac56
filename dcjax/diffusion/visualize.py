"""Decoding-order pictures: at which step each completion token appeared.

`decoding_order_html` renders each sample's completion as a grid of token cells coloured
from blue (revealed early) to red (revealed late), with the step in the cell's corner and
tooltip; `decoding_order_png` draws the [B, N] reveal-step matrix as a heat map.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.sample { margin-bottom: 2em; }
.prompt { white-space: pre-wrap; color: #555; font-family: monospace; margin-bottom: .4em; }
.grid { display: grid; grid-template-columns: repeat(COLUMNS, minmax(2.6em, auto)); gap: 2px; }
.tok { position: relative; font-family: monospace; padding: 0.9em 0.25em 0.2em;
       border-radius: 3px; white-space: pre; overflow: hidden; min-height: 1.2em; }
.tok sub { position: absolute; top: 1px; left: 2px; font-size: 60%; opacity: .75; }
.legend span { display: inline-block; width: 1.2em; height: .8em; }
"""


def step_colour(step: int, num_steps: int) -> str:
  """HSL colour: hue 240 (blue, first step) to 0 (red, last step); grey when unknown."""
  if step < 0:
    return "hsl(0, 0%, 85%)"
  frac = step / max(num_steps - 1, 1)
  return f"hsl({240 * (1 - frac):.0f}, 75%, 80%)"


def _visible(text: str) -> str:
  return text.replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def decoding_order_html(token_texts: Sequence[Sequence[str]], reveal_steps_BxN,
                        *, prompts: Sequence[str] | None = None, num_steps: int | None = None,
                        title: str = "Decoding order", columns: int = 16) -> str:
  """A self-contained HTML page; `token_texts[b][j]` is the text of completion token j."""
  steps = np.asarray(reveal_steps_BxN)
  if steps.ndim != 2 or len(token_texts) != steps.shape[0]:
    raise ValueError(f"reveal_steps_BxN has shape {steps.shape}; expected [B, N] with B = "
                     f"{len(token_texts)} (the number of token_texts rows)")
  total = int(num_steps if num_steps is not None else max(int(steps.max()) + 1, 1))
  legend = "".join(f'<span style="background:{step_colour(s, total)}"></span>'
                   for s in np.linspace(0, total - 1, min(total, 24)).astype(int))
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE.replace('COLUMNS', str(columns))}</style></head><body>",
           f"<h2>{html.escape(title)}</h2>",
           f"<p class='legend'>step 0 {legend} step {total - 1}</p>"]
  for b, texts in enumerate(token_texts):
    parts.append("<div class='sample'>")
    if prompts is not None:
      parts.append(f"<div class='prompt'>{html.escape(prompts[b])}</div>")
    parts.append("<div class='grid'>")
    for j, text in enumerate(texts):
      s = int(steps[b, j])
      parts.append(f"<div class='tok' style='background:{step_colour(s, total)}' "
                   f"title='position {j}, step {s}'><sub>{s}</sub>"
                   f"{html.escape(_visible(text))}</div>")
    parts.append("</div></div>")
  parts.append("</body></html>")
  return "".join(parts)


def decoding_order_png(reveal_steps_BxN, path: str, *, title: str = "Decoding order") -> None:
  """Heat map of reveal steps (rows = samples, columns = completion positions)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = np.asarray(reveal_steps_BxN)
  fig, ax = plt.subplots(figsize=(min(2 + steps.shape[1] / 8, 20), 1 + steps.shape[0] * 0.4))
  image = ax.imshow(steps, aspect="auto", cmap="coolwarm", interpolation="nearest")
  ax.set_xlabel("completion position")
  ax.set_ylabel("sample")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label="reveal step")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
