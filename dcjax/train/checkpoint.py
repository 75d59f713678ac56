"""orbax checkpoints of the train state, the grain iterator, a small JSON description and the
state's fingerprints; verified on restore, never written when non-finite.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta, integrity}`. `state` restores
straight into the current mesh's shardings (any device count); `data` is each host's grain
iterator state; `meta` names the model and data shapes so a mismatch is reported field by
field instead of as a shape error deep inside orbax; `integrity` holds a fingerprint per state
array (dcjax.train.integrity), checked after every restore.

A checkpoint that cannot be read or fails its check is reported in one line (step, item,
array). With `verify="skip"` (the default) the previous checkpoint is restored instead and the
damaged one is moved aside to `<step>.corrupt` (orbax ignores that name); with `"fatal"` the
error stops the run. Retention is done here, not by orbax: a step is deleted only once `keep`
newer saves have finished writing, so the newest good checkpoint is never deleted by a save
that later fails (between two saves one extra checkpoint may be on disk). An async save that
fails (e.g. disk full) stops the run at the next `check()` with one line naming the path, the
free space and the checkpoint kept.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

from dcjax import workdir as workdir_lib
from dcjax.model.config import RUNTIME_FIELDS
from dcjax.train import integrity

VERIFY_MODES = ("skip", "fatal")


class CheckpointError(RuntimeError):
  """A checkpoint is corrupt or does not match the run; the message says which and where."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files cannot be read or do not match their recorded fingerprints."""


def _flat_shapes(tree) -> dict[str, tuple]:
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out[jax.tree_util.keystr(path)] = tuple(shape)
  return out


def validate_section(section, prefix: str = "config.checkpoint", error=ValueError) -> None:
  """Checks `verify` (shared by the train and GRPO configs); raises `error` naming it."""
  verify = section.get("verify", "skip")
  if verify not in VERIFY_MODES:
    raise error(f"{prefix}.verify={verify!r} must be one of {VERIFY_MODES}: 'skip' restores "
                "the previous checkpoint when the newest is corrupt, 'fatal' stops the run")


class Checkpointer:
  """CheckpointManager with save interval, verified keep-N and (optionally) async saves."""

  def __init__(self, directory: str, *, interval: int, keep: int, async_save: bool = True,
               verify: str = "skip", after_save: Callable[[], object] | None = None,
               log: Callable[[str], object] = absl_logging.warning):
    if verify not in VERIFY_MODES:
      raise ValueError(f"verify={verify!r} must be one of {VERIFY_MODES}")
    self.directory = workdir_lib.abspath(directory)  # gs:// stays as it is
    self.after_save = after_save  # e.g. push the workdir mirror's logs after each checkpoint
    self.interval = max(1, int(interval))
    self.keep = int(keep)  # 0: keep all
    self.verify = verify
    self.log = log
    self._pending: int | None = None  # step of the save in flight
    self._save_failed = False
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=self.interval, max_to_keep=None,  # retention: see _prune
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler(),
                           integrity=ocp.JsonCheckpointHandler()))

  @classmethod
  def from_config(cls, directory: str, section, **kwargs) -> "Checkpointer":
    """From a `config.checkpoint` section (interval, keep, async_save, verify)."""
    return cls(directory, interval=section.interval, keep=section.keep,
               async_save=section.async_save, verify=section.get("verify", "skip"), **kwargs)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Every `interval` steps (orbax's own policy would also save the first step)."""
    return step % self.interval == 0

  def _where(self, step: int) -> str:
    return workdir_lib.join(self.directory, str(step))

  # ---- saving ------------------------------------------------------------------------------

  def save(self, step: int, state, data_iterator, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves (async when enabled) if the interval says so or `force`; True if it did.

    Raises CheckpointError, writing nothing, if an array of `state` holds NaN or Inf, and if
    the previous save failed or this one cannot start.
    """
    if not (force or self.should_save(step)):
      return False
    self._finish_pending()
    self._prune()
    prints = integrity.fingerprint(state)
    if prints.non_finite:
      raise CheckpointError(
          f"not saving checkpoint step {step}: {prints.non_finite[0]} holds NaN or Inf "
          f"({len(prints.non_finite)} arrays are not finite); {self._kept(step)}")
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                integrity=ocp.args.JsonSave(prints.to_json()))
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._pending = step
    if not self.manager.is_saving_in_progress():  # synchronous: already written
      self._finish_pending()
    if self.after_save is not None:
      self.after_save()
    return True

  def check(self) -> None:
    """Raises the CheckpointError of a background save that has failed (cheap; call it after
    every step so a failed save stops the run at once instead of an interval later)."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self) -> None:
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, e: BaseException) -> CheckpointError:
    self._save_failed = True
    what = "disk full: " if integrity.is_disk_full(e) else ""
    return CheckpointError(
        f"saving checkpoint step {step} to {self._where(step)} failed: {what}"
        f"{integrity.cause_line(e)}; {integrity.free_space(self.directory)} in "
        f"{self.directory}; {self._kept(step)}")

  def _kept(self, failed_step: int) -> str:
    done = [s for s in self.manager.all_steps() if s != failed_step]
    return (f"the latest checkpoint, step {max(done)}, is kept" if done
            else "no earlier checkpoint exists")

  def _prune(self) -> None:
    """Deletes all but the `keep` newest finished steps (a collective: call it at a save)."""
    if self.keep:
      for step in sorted(self.manager.all_steps())[:-self.keep]:
        self.manager.delete(step)

  # ---- restoring ---------------------------------------------------------------------------

  def _read(self, step: int, item: str, arg):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{item: arg}))[item]
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(f"checkpoint step {step} in {self._where(step)} is corrupt: "
                                   f"item {item} cannot be read: {integrity.cause_line(e)}"
                                   ) from e

  def read_meta(self, step: int) -> dict[str, Any]:
    return dict(self._read(step, "meta", ocp.args.JsonRestore()))

  def restore(self, step: int, abstract_state, data_iterator, expected_meta: dict[str, Any]):
    """The state at `step` in `abstract_state`'s shardings, checked against the fingerprints
    recorded when it was saved; the iterator is reset in place.

    Raises CorruptCheckpointError (step, item, array) if it is damaged, CheckpointError if it
    does not match this run.
    """
    where = self._where(step)
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
    recorded = None
    if (epath.Path(where) / "integrity").exists():
      recorded = self._read(step, "integrity", ocp.args.JsonRestore())
    state = self._read(step, "state", ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      self._read(step, "data", grain.checkpoint.CheckpointRestore(data_iterator))
    if recorded is None:
      self.log(f"checkpoint step {step} has no fingerprints (written by an older dcjax): "
               "restored without verification")
      return state
    bad = integrity.differing(recorded, integrity.fingerprint(state))
    if bad:
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {where} is corrupt: item state, array {bad[0]}: its data "
          f"does not match the fingerprint recorded when it was saved ({len(bad)} of "
          f"{len(recorded.get('arrays', {}))} arrays differ)")
    return state

  def restore_latest(self, abstract_state, data_iterator, expected_meta: dict[str, Any]):
    """(step, state) of the newest checkpoint that restores and verifies (see the module doc).

    Raises CheckpointError if none does, or if the newest fails and verify is "fatal".
    """
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator, expected_meta)
      except CorruptCheckpointError as e:
        if self.verify == "fatal":
          raise CorruptCheckpointError(
              f"{e} (config.checkpoint.verify='fatal'; 'skip' restores the previous "
              "checkpoint instead)") from e
        self.log(f"warning: {e}; skipping it")
        skipped.append(step)
        continue
      self._move_aside(skipped)
      return step, state
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored: step(s) "
        f"{', '.join(map(str, skipped)) or 'none'} are corrupt (reported above); move them "
        "aside to start from scratch")

  def _move_aside(self, steps: list[int]) -> None:
    """Renames corrupt steps to `<step>.corrupt` so that a new save may reuse the step."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        src = epath.Path(self._where(step))
        dst, n = src.parent / f"{step}.corrupt", 1
        while dst.exists():
          dst, n = src.parent / f"{step}.corrupt-{n}", n + 1
        src.rename(dst)
        self.log(f"moved corrupt checkpoint step {step} to {dst}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("dcjax_checkpoint_move_aside")
    self.manager.reload()

  def wait(self) -> None:
    self._finish_pending()

  def close(self) -> None:
    """Waits for a save in flight (raising its error), prunes, and closes orbax."""
    try:
      self._finish_pending()
      if not self._save_failed:
        self._prune()
    finally:
      self.manager.close()


def make_meta(model_config, config, state, tokenizer: str | None = None) -> dict[str, Any]:
  """What a resumed run must agree on, plus the state's shapes for a clear mismatch error and
  the tokenizer the run uses (`dcjax.train.handoff.tokenizer_record`; not compared)."""
  meta = dict(
      model={k: v for k, v in model_config.to_dict().items()
             if k not in RUNTIME_FIELDS},
      data=dict(kind=config.data.kind, seq_len=int(config.data.seq_len)),
      train=dict(batch_size=int(config.train.batch_size)),
      state_shapes={k: list(v) for k, v in _flat_shapes(state).items()},
  )
  if tokenizer:
    meta["tokenizer"] = tokenizer
  return meta


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
  """Drops orbax's per-save INFO lines from the absl log and cuts its error records to their
  first line (no traceback): the CheckpointError raised here carries the cause."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    if record.exc_info or record.exc_text:
      record.msg = record.getMessage().splitlines()[0]
      record.args, record.exc_info, record.exc_text = (), None, None
    return True


def quiet_orbax_logs() -> None:
  """Installs the filter on absl's handler once (idempotent)."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())
