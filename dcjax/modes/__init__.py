"""The job runners, one module per `config.mode`: each has `run(config, workdir)` and
usually a `validate(config)` hook. Nothing in the library imports them."""
