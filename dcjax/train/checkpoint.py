"""orbax checkpoints of the train state, the grain iterator and a small JSON description.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`. `state` restores straight into
the current mesh's shardings (any device count); `data` is each host's grain iterator
state; `meta` names the model and data shapes so a mismatch is reported field by field
instead of as a shape error deep inside orbax.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from dcjax import workdir as workdir_lib


class CheckpointError(RuntimeError):
  """A checkpoint is corrupt or does not match the run; the message says which and where."""


def _flat_shapes(tree) -> dict[str, tuple]:
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out[jax.tree_util.keystr(path)] = tuple(shape)
  return out


class Checkpointer:
  """CheckpointManager with save interval, keep-N and (optionally) async saves."""

  def __init__(self, directory: str, *, interval: int, keep: int, async_save: bool = True,
               after_save: Callable[[], object] | None = None):
    self.directory = workdir_lib.abspath(directory)  # gs:// stays as it is
    self.after_save = after_save  # e.g. push the workdir mirror's logs after each checkpoint
    self.interval = max(1, int(interval))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(interval)), max_to_keep=int(keep) if keep else None,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Every `interval` steps (orbax's own policy would also save the first step)."""
    return step % self.interval == 0

  def save(self, step: int, state, data_iterator, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves (async when enabled) if the interval says so or `force`; True if it did."""
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved and self.after_save is not None:
      self.after_save()
    return saved

  def read_meta(self, step: int) -> dict[str, Any]:
    where = workdir_lib.join(self.directory, str(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored["meta"])
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {where} is corrupt: its meta item cannot be read "
                            f"({type(e).__name__}: {e})") from e

  def restore(self, step: int, abstract_state, data_iterator, expected_meta: dict[str, Any]):
    """The state at `step` in `abstract_state`'s shardings; the iterator is reset in place."""
    where = workdir_lib.join(self.directory, str(step))
    meta = self.read_meta(step)
    check_compatible(meta, expected_meta, where)
    saved_shapes = meta.get("state_shapes")
    if saved_shapes is not None:
      current = {k: list(v) for k, v in _flat_shapes(abstract_state).items()}
      diff = sorted(k for k in set(current) | set(saved_shapes)
                    if current.get(k) != saved_shapes.get(k))
      if diff:
        first = diff[0]
        raise CheckpointError(
            f"checkpoint {where} is incompatible with this run: {len(diff)} state entries "
            f"differ, e.g. {first}: checkpoint {saved_shapes.get(first)} vs run "
            f"{current.get(first)} (was the optimiser or model config changed?)")
    args = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {where} is corrupt or cannot be restored into this "
                            f"mesh: "
                            f"{type(e).__name__}: {str(e)[:500]}") from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def make_meta(model_config, config, state) -> dict[str, Any]:
  """What a resumed run must agree on, plus the state's shapes for a clear mismatch error."""
  return dict(
      model={k: v for k, v in model_config.to_dict().items()
             if k not in ("dtype", "remat_policy", "attention_impl")},
      data=dict(kind=config.data.kind, seq_len=int(config.data.seq_len)),
      train=dict(batch_size=int(config.train.batch_size)),
      state_shapes={k: list(v) for k, v in _flat_shapes(state).items()},
  )


def check_compatible(saved: dict[str, Any], expected: dict[str, Any], where: str) -> None:
  """Raises CheckpointError naming the first config field that differs."""
  for section in ("model", "data", "train"):
    old, new = saved.get(section, {}), expected.get(section, {})
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        raise CheckpointError(
            f"checkpoint {where} is incompatible with this run: config.{section}.{key} was "
            f"{old.get(key)!r} when it was written, now {new.get(key)!r}")


class _QuietOrbax(logging.Filter):
  """Drops orbax's per-save INFO lines from the absl log; warnings still pass."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  """Installs the filter on absl's handler once (idempotent)."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())
