"""Small apps that real servers (gunicorn, uvicorn, hypercorn, node) run in the real-server tests.

Each app is configured by environment variables, so one config rewrite before an upgrade makes
generation N+1 slow, broken or crashing while N stays healthy:

- ``APP_VERSION``: written into every response (``X-Handoff-Generation``), so the load client
  sees which generation answered.
- ``APP_IMPORT_DELAY``: seconds the import (Python) or the start-up (node) takes before the
  server can accept.
- ``APP_MODE``: ``ok``; ``import-error`` (the module raises ImportError: gunicorn's worker exits
  with its boot-error code, the arbiter halts); ``exit`` (the process exits 1 during import or
  start-up); ``crash-after-ready`` (the server process exits 1 ``APP_CRASH_AFTER`` seconds,
  default 1, after it started accepting).
- ``APP_FAIL_IF_EXISTS``: a path; while it exists, every start fails as ``import-error`` does
  (a crash loop that a test can begin and end without an upgrade).
- ``APP_LATE_WORKER_DELAY`` (gunicorn_conf.py): the second gunicorn worker boots this many
  seconds after the first.
"""
