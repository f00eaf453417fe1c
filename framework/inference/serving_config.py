"""The `serving` config section: the HTTP server's queue, timeouts and name (framework/inference/server.py).

Kept apart from server.py so the config composes without the `serve` extra (FastAPI, uvicorn) installed.
"""
from __future__ import annotations

import ml_collections

from framework.config_checks import Context, fail, positive


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      max_queue=256,            # requests waiting for a slot; one more answers 429 with Retry-After
      retry_after_s=1,          # the Retry-After a 429 suggests
      request_timeout_s=600.0,  # a request still unfinished after this long is cancelled (504, or an error event)
      shutdown_timeout_s=30.0,  # on SIGTERM: in-flight requests get this long to finish, then are cancelled
      model_name='',            # the id /v1/models lists and requests may name; '' : the workdir's or directory's name
  ))


def validate(cfg, ctx: Context) -> None:
  s = cfg.serving
  positive(s, 'serving', 'max_queue', 'retry_after_s', 'request_timeout_s', 'shutdown_timeout_s')
  if any(c.isspace() for c in s.model_name):
    fail('serving.model_name', f'{s.model_name!r} holds whitespace; use a plain id such as "lm_tiny"')
  del ctx
