"""The resolved config of a run, saved in its workdir; a resume with a different config stops.

`record(config, workdir)` (main.py, after validation, before the mode runs; docs/runs.md):

- train and grpo, the modes whose workdir holds checkpoints they resume from, write
  `<workdir>/config.json`; the other modes write `<workdir>/config.<mode>.json`, which never
  stops anything (a sample or eval run pointed at a training workdir leaves its config.json
  alone).
- A resume (config.json and a checkpoint step are there, and config.checkpoint.restore is on)
  whose config differs outside `ALLOWED_CHANGES` prints each difference (field: old -> new)
  and raises ConfigChangedError, unless config.allow_config_change is True: then the old file
  is kept as `config.<UTC time>.json` and config.json rewritten.
- A run that starts from scratch over an old config.json keeps the old one the same way.

Process 0 reads and writes (through the workdir: a gs:// workdir gets the file at once, not at
the next push); on a pod its verdict is broadcast so every process stops together.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from dcjax import workdir as workdir_lib
from dcjax.config import ConfigError

RESUMING_MODES = ("train", "grpo")

# Fields that may differ between a run and its resume without allow_config_change: how the job
# is launched, observed or stopped, never what it computes. fnmatch patterns on dotted names.
ALLOWED_CHANGES = (
    "allow_config_change",        # the switch itself
    "profile_steps",              # a trace of some steps: timing only
    "wandb.*",                    # where metrics are mirrored
    "compile_*",                  # mode=compile's target slice; unused by train / grpo
    "multihost", "distributed.*",  # how processes find each other
    "train.preempt_at_step",      # a test / drill switch that stops the run
    "train.sample_prompt", "train.sample_new_tokens", "train.sample_steps",  # the final sample
    "train.log_every", "rl.log_every", "rl.log_completions", "warm_start.log_every",
    "checkpoint.async_save",      # how saves are written, not what
    "model.scan_layers",          # a loop or a scan over the same layers and parameters
    "serve.*", "prompts_file", "outputs_file",  # mode=serve / sample inputs; unused by training
)


class ConfigChangedError(ConfigError):
  """A resume's config differs from the one its checkpoints were written under."""


def config_file(mode: str) -> str:
  return "config.json" if mode in RESUMING_MODES else f"config.{mode}.json"


def to_json_dict(config) -> dict:
  """The config as JSON types (tuples -> lists), as it is written and read back."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"train": {"lr": 1}} -> {"train.lr": 1}; leaves (lists included) kept as they are."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    name = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, dict) and value:
      out.update(flatten(value, name))
    else:
      out[name] = value
  return out


def allowed(field: str) -> bool:
  return any(fnmatch.fnmatchcase(field, pattern) for pattern in ALLOWED_CHANGES)


_ABSENT = "<absent>"


def differences(old: dict, new: dict, *, include_allowed: bool = False) -> list[tuple]:
  """[(field, old value, new value)] over the flattened configs, sorted by field."""
  a, b = flatten(old), flatten(new)
  out = []
  for field in sorted(set(a) | set(b)):
    x, y = a.get(field, _ABSENT), b.get(field, _ABSENT)
    if x != y and (include_allowed or not allowed(field)):
      out.append((field, x, y))
  return out


def describe(diffs: list[tuple]) -> str:
  return "\n".join(f"  {field}: {x!r} -> {y!r}" for field, x, y in diffs)


def has_checkpoints(wd: workdir_lib.Workdir) -> bool:
  """Whether `<root>/checkpoints` holds a step directory (local or through epath)."""
  try:
    path = workdir_lib._epath(wd.checkpoints)  # pylint: disable=protected-access
    return path.exists() and any(p.name.isdigit() for p in path.iterdir())
  except Exception as e:  # pylint: disable=broad-except
    raise OSError(f"cannot list {wd.checkpoints}: {type(e).__name__}: {e}") from e


def _read(wd: workdir_lib.Workdir, name: str) -> dict | None:
  local = wd.path(name)
  if not os.path.exists(local) and wd.mirrored:
    wd._fetch(name)  # pylint: disable=protected-access
  if not os.path.exists(local):
    return None
  with open(local) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{local}: not valid JSON ({e}); move it away to start over") from None


def _write(wd: workdir_lib.Workdir, name: str, data: dict) -> None:
  os.makedirs(wd.local, exist_ok=True)
  tmp = wd.path(name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, wd.path(name))
  wd.publish(name)


def _keep_old(wd: workdir_lib.Workdir, name: str, old: dict) -> str:
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  kept = name[:-len(".json")] + f".{stamp}.json"
  _write(wd, kept, old)
  return kept


def record(config, workdir: "str | workdir_lib.Workdir",
           log: Callable[[str], None] = print) -> str:
  """Saves the resolved config (see the module doc); returns the file's name in the workdir.
  Raises ConfigChangedError on a resume with a changed config (every process)."""
  wd = workdir_lib.resolve(workdir)
  name = config_file(config.mode)
  new = to_json_dict(config)
  error = ""
  if jax.process_index() == 0:
    error = _record(config, wd, name, new, log)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    refused = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    if int(refused) and not error:
      error = "process 0 refused the resume: the config differs from the run's config.json"
  if error:
    raise ConfigChangedError(error)
  return name


def _record(config, wd, name, new, log) -> str:
  old = _read(wd, name)
  if old is None:
    _write(wd, name, new)
    return ""
  diffs = differences(old, new)
  resuming = (config.mode in RESUMING_MODES and bool(config.get("checkpoint", {}).get("restore", True))
              and has_checkpoints(wd))
  if diffs and resuming and not config.get("allow_config_change", False):
    where = wd.shared_path(name)
    message = (f"this run resumes the checkpoints in {wd.checkpoints}, but its config differs "
               f"from {where} in {len(diffs)} field(s) (field: old -> new):\n{describe(diffs)}\n"
               "Rerun with the recorded values, use a new --workdir, or pass "
               "--config.allow_config_change=True to resume with the new config (the old one "
               "is kept beside it).")
    return message
  if diffs and config.mode in RESUMING_MODES:
    kept = _keep_old(wd, name, old)
    why = "resuming with a changed config" if resuming else "starting over"
    log(f"{why}; {name} rewritten, the previous one kept as {kept}:\n{describe(diffs)}")
  if old != new:
    _write(wd, name, new)
  return ""
