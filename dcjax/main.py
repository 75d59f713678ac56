"""dcjax entry point: `python -m dcjax.main --config configs/<x>.py --workdir DIR`.

Flags, config validation, multi-host initialisation (`dcjax.parallel.distributed`), the
workdir (local, or gs:// through a local mirror: `dcjax.workdir`), then dispatch on
`config.mode`.
"""

from dcjax import host_malloc

host_malloc.tune()  # before jax allocates anything (docs/performance.md, "Host memory")

# pylint: disable=wrong-import-position
from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dcjax import config as config_lib  # noqa: E402
from dcjax import run_config  # noqa: E402
from dcjax import workdir as workdir_lib  # noqa: E402
from dcjax.parallel import distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs "
                               "(required by every mode but compile).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  if config.mode == "compile":  # one process, any host; nothing is written (docs/compile.md)
    from dcjax.modes import compile as compile_mode
    compile_mode.run(config, flags.FLAGS["config"].config_filename)
    return
  if _WORKDIR.value is None:
    raise app.UsageError(f"--workdir is required for mode={config.mode!r}")
  distributed.initialize(config)
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  run, _ = config_lib.resolve_mode(config.mode)
  workdir = workdir_lib.Workdir.create(_WORKDIR.value)
  if workdir.mirrored:
    logging.info("workdir %s: host files in %s, pushed after each checkpoint", workdir.root,
                 workdir.local)
  workdir.pull()  # a run resumed on a fresh VM continues the metrics it had pushed
  try:  # <workdir>/config.json; a resume with a changed config stops here (docs/runs.md)
    run_config.record(config, workdir, log=logging.info)
  except run_config.ConfigChangedError as e:
    raise SystemExit(f"error: {e}") from None
  try:
    run(config, workdir)
  finally:
    workdir.push()


if __name__ == "__main__":
  app.run(main)
