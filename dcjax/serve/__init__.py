"""Serving the sampler: an OpenAI-compatible HTTP server (mode=serve) and batch sampling of a
prompts file (mode=sample's `config.prompts_file`); docs/serving.md.

  settings.py      config.serve -> Settings
  engine.py        Options, Engine: fixed-shape batches through the compiled sampler
  requests.py      OpenAI request bodies -> prompts + Options, RequestError (4xx)
  batcher.py       the queue that gathers requests into batches
  server.py        the HTTP server and its endpoints
  prompts_file.py  JSONL prompts -> JSONL completions
"""
