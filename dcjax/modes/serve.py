"""`mode="serve"`: an OpenAI-compatible HTTP server over the compiled sampler (docs/serving.md).

  python -m dcjax.main --config configs/sample.py --workdir runs/serve --config.mode=serve

loads the model as mode=sample does (`hf_dir`, `checkpoint_dir`, or a random tiny one),
compiles the default program (`config.sampler`, `serve.warmup`), and serves
`http://<serve.host>:<serve.port>/v1` until interrupted (or `serve.max_requests` answers).
"""

from __future__ import annotations

import jax

from dcjax import workdir as workdir_lib
from dcjax.config import ConfigError
from dcjax.diffusion.loading import load_model_and_tokenizer
from dcjax.diffusion.sampler_config import validate_sampler
from dcjax.parallel import mesh as mesh_lib
from dcjax.serve.engine import Engine, Options
from dcjax.serve.server import Server
from dcjax.serve.settings import settings_from_config
from dcjax.train import handoff


def validate(config) -> None:
  if "sampler" not in config:
    raise ConfigError("config.sampler is missing (see configs/sample.py)")
  validate_sampler(config.sampler)
  settings = settings_from_config(config)
  if config.sampler.max_new_tokens > settings.max_tokens:
    raise ConfigError(f"config.sampler.max_new_tokens={config.sampler.max_new_tokens} is more "
                      f"than config.serve.max_tokens={settings.max_tokens}")


def run(config, workdir: "str | workdir_lib.Workdir") -> None:
  validate(config)
  del workdir  # the server writes nothing; main.py records config.serve.json there
  if jax.process_count() > 1:
    raise ConfigError("mode=serve runs in one process (one host); a pod's processes would "
                      "have to run every batch together")
  settings = settings_from_config(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  model_config, params, tokenizer = load_model_and_tokenizer(
      config, mesh, handoff.from_config(config, "checkpoint_dir"))
  engine = Engine(model_config, params, tokenizer, mesh, settings, seed=config.seed)
  if settings.warmup:
    engine.run([tokenizer.encode("hi")], Options.from_section(config.sampler))
  server = Server(engine, config.sampler)
  print(f"serving {settings.model_name!r} at {server.url}/v1 (batches of {engine.batch_size}, "
        f"{dict(mesh.shape)}); Ctrl-C stops", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.stop()
  print(f"served {server.requests} requests in {engine.stats['batches']} batches, "
        f"{engine.compiles} compiled programs", flush=True)
