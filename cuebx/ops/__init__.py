"""Operations: the Python API behind ``cuebx dlq``, ``cuebx status`` and ``cuebx topology diff``.

Each command of the command line is a thin layer over a function or method here
(`cuebx.ops.commands` holds the commands), so whatever an operator can do at 3 a.m. in a
shell, a script can do in Python:

- `cuebx.ops.dlq.DeadLetters` (``app.dlq``): list, show, replay, purge and export dead
  letters, by sweeps that never return a message to its queue (`cuebx.ops.sweep`);
- `cuebx.ops.records`: what a dead letter says, filters and summaries (pure);
- `cuebx.ops.status`: queue depths, tiers and dead-letter queues, without the management
  plugin;
- `cuebx.ops.diff`: the broker against the app's plan, and the migrations for differences;
- `cuebx.ops.health` and `cuebx.ops.http`: the worker's health as data, and the small server
  of ``/metrics``, ``/healthz`` and ``/readyz``;
- `cuebx.ops.logs`: JSON log lines.

Metrics and tracing are middleware in `cuebx.metrics` and `cuebx.tracing`, imported only
with their extras installed.
"""
