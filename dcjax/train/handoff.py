"""A previous run's orbax workdir as the model of the next stage (docs/checkpoints.md).

`config.init_from=W[:step]` (train, grpo) and `config.checkpoint_dir=W[:step]` (sample, eval)
name a workdir that a train or grpo run wrote; mode=export reads its own workdir the same way.
`open_source` reads the step's `meta` (the model config the run saved, and the tokenizer it
used); `Source.load_params` restores only the `params` of the TrainState / RLState (no
optimiser moments, no reference), straight into their shardings on the mesh, and checks them
against the fingerprints recorded at save time.

The tokenizer is recorded in each checkpoint's meta as `tokenizer` (a path relative to the
workdir when it lives there, e.g. the cached `tokenizer/sp2048.model`, else absolute). Older
checkpoints without the record fall back to the one `tokenizer/sp*.model` in the workdir.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import flax.linen as nn
import flax.struct
import jax
import orbax.checkpoint as ocp
from etils import epath

from dcjax import workdir as workdir_lib
from dcjax.config import ConfigError
from dcjax.model.config import ModelConfig
from dcjax.model.params import abstract_params, param_shardings
from dcjax.train import integrity

_STEP = re.compile(r"^(.*):(\d+)$")


def parse(spec: str) -> tuple[str, int | None]:
  """`W` or `W:step` -> (W, step or None); a URL's own `gs://` colon is never a step."""
  match = _STEP.match(spec)
  if match and match.group(1):
    return match.group(1), int(match.group(2))
  return spec, None


@flax.struct.dataclass
class _Params:  # keystr paths ".params[...]", as the saved TrainState / RLState records them
  params: dict


@dataclasses.dataclass(frozen=True)
class Source:
  """One checkpoint step of a previous run: its model config, tokenizer and (lazily) params."""

  field: str                 # the config field that named it, for errors
  workdir: str               # the run's workdir root
  step: int
  model_config: ModelConfig  # as saved (no runtime fields applied)
  tokenizer_path: str | None
  meta: dict

  @property
  def where(self) -> str:
    return workdir_lib.join(self.workdir, workdir_lib.CHECKPOINTS, str(self.step))

  def load_params(self, model_config: ModelConfig | None = None, mesh=None):
    """The policy params, placed in `model_config`'s shardings on `mesh` (param dtype as
    saved); each process reads only its shards. Raises ConfigError naming the step and array
    if the data does not match the fingerprints recorded when it was saved."""
    model_config = model_config or self.model_config
    abstract = nn.meta.unbox(abstract_params(model_config))
    if mesh is None:
      shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                               abstract)
    else:
      shardings = param_shardings(model_config, mesh)
    target = {"params": jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)}
    manager = _manager(self.workdir)
    try:
      restored = manager.restore(self.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))["state"]
      recorded = None
      if (epath.Path(self.where) / "integrity").exists():
        recorded = manager.restore(self.step, args=ocp.args.Composite(
            integrity=ocp.args.JsonRestore()))["integrity"]
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{self.field}: cannot read the params of checkpoint {self.where}: "
                        f"{integrity.cause_line(e)}") from e
    finally:
      manager.close()
    params = restored["params"]
    if recorded is not None:
      prints = integrity.fingerprint(_Params(params=params))
      saved = {k: v for k, v in recorded.get("arrays", {}).items() if k.startswith(".params")}
      bad = integrity.differing({"arrays": saved}, prints)
      if bad:
        raise ConfigError(f"{self.field}: checkpoint {self.where} is corrupt: array {bad[0]} "
                          f"does not match the fingerprint recorded when it was saved")
    return params


def _manager(root: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
  return ocp.CheckpointManager(
      workdir_lib.join(workdir_lib.abspath(root), workdir_lib.CHECKPOINTS), options=options,
      item_handlers=dict(state=ocp.PyTreeCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
                         integrity=ocp.JsonCheckpointHandler()))


def open_source(spec: str, field: str, step: int | None = None) -> Source:
  """The checkpoint `spec` (`W` = its newest step, or `W:step`; `step` overrides) names;
  `field` is the config field for errors (e.g. "config.init_from"). Raises ConfigError
  naming the path and the available steps when there is no such checkpoint."""
  root, spec_step = parse(spec)
  step = spec_step if step is None else step
  root = workdir_lib.abspath(root)
  directory = workdir_lib.join(root, workdir_lib.CHECKPOINTS)
  if not workdir_lib.is_remote(root) and not os.path.isdir(directory):
    raise ConfigError(f"{field}={spec!r}: {directory} does not exist (expected the workdir of "
                      f"a train or grpo run, which keeps its orbax checkpoints there)")
  manager = _manager(root)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise ConfigError(f"{field}={spec!r}: no checkpoint in {directory}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ConfigError(f"{field}={spec!r}: no checkpoint step {step} in {directory}; "
                        f"available steps: {steps}")
    try:
      meta = dict(manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{field}={spec!r}: cannot read the meta of checkpoint step {step} in "
                        f"{directory}: {integrity.cause_line(e)}") from e
  finally:
    manager.close()
  where = workdir_lib.join(directory, str(step))
  try:
    model_config = ModelConfig.from_dict(meta["model"])
    model_config.validate(f"{where} meta.model")
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{field}={spec!r}: checkpoint {where} holds no usable model config "
                      f"in its meta ({e})") from None
  return Source(field=field, workdir=root, step=step, model_config=model_config,
                tokenizer_path=_tokenizer_path(root, meta.get("tokenizer")), meta=meta)


def from_config(config, field: str) -> Source | None:
  """`open_source(config.<field>)`, or None when the field is empty or absent."""
  spec = config.get(field) or ""
  return open_source(spec, f"config.{field}") if spec else None


def _tokenizer_path(root: str, recorded: str | None) -> str | None:
  """The recorded tokenizer (relative to the workdir, or absolute), else the workdir's one
  cached sentencepiece model; None when neither exists."""
  wd = workdir_lib.Workdir.create(root)
  if recorded:
    if os.path.isabs(recorded) or workdir_lib.is_remote(recorded):
      return recorded
    if wd.mirrored:  # a bucket: fetched to the local mirror once
      return wd.shared_file(recorded, lambda p: None)
    return wd.path(recorded)
  if wd.mirrored:
    return None
  found = sorted(glob.glob(wd.path("tokenizer", "sp*.model")))
  return found[0] if len(found) == 1 else None


def tokenizer_record(tok, wd: "str | workdir_lib.Workdir") -> str | None:
  """What a checkpoint's meta records of tokenizer `tok` (its `path`): relative to the
  workdir when it lives there."""
  path = getattr(tok, "path", None)
  if not path:
    return None
  wd = workdir_lib.resolve(wd)
  if not workdir_lib.is_remote(path):
    path = os.path.abspath(path)
    local = os.path.abspath(wd.local)
    if os.path.commonpath([path, local]) == local:
      return os.path.relpath(path, local)
  return path

