"""dcjax entry point: `python -m dcjax.main --config configs/<x>.py --workdir DIR`.

Flags, multi-host initialisation, config validation, then dispatch on `config.mode`.
"""

import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from dcjax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def _is_multihost(config) -> bool:
  """Multi-host when asked for, or on a TPU pod slice / a cluster JAX auto-detects."""
  if config.get("multihost", False):
    return True
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts or "JAX_COORDINATOR_ADDRESS" in os.environ


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  if _is_multihost(config):
    jax.distributed.initialize()
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  run, _ = config_lib.resolve_mode(config.mode)
  if "://" not in _WORKDIR.value:  # gs:// workdirs are created by the writers (orbax, tf.io)
    os.makedirs(_WORKDIR.value, exist_ok=True)
  run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
