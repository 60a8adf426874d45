"""Operations: the Python API behind ``cuebx dlq``, ``cuebx status`` and ``cuebx topology diff``.

Each command of the command line is a thin layer over a function or method here, so
whatever an operator can do at 3 a.m. in a shell, a script can do in Python:

- `cuebx.ops.dlq.DeadLetters` (``app.dlq``): list, show, replay, purge and export dead
  letters, by sweeps that never return a message to its queue (`cuebx.ops.sweep`);
- `cuebx.ops.records`: what a dead letter says, filters and summaries (pure).
"""
