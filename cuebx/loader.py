"""Find an app by its import path, ``module[:attribute]``, as ``cuebx -A`` and workers do.

A worker process (the command line, or a child of ``cuebx worker --processes``) knows its app
only by this path: importing the module registers the tasks.
"""

from __future__ import annotations

import importlib
import os
import sys

from cuebx.app import Cuebx
from cuebx.errors import AppNotFoundError, CuebxError

__all__ = ["load_app"]


def load_app(path: str) -> Cuebx:
    """Import ``module[:attribute]`` and return its `Cuebx` app.

    Without an attribute, the module must hold exactly one `Cuebx` instance.

    Raises:
        AppNotFoundError: one line saying what could not be found or why it failed.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name:
        raise AppNotFoundError(f"-A {path!r}: expected module or module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppNotFoundError(f"-A {path!r}: no module named {exc.name!r}") from None
        raise
    except CuebxError as exc:
        # A task or app option refused while the module was imported: the message says
        # which task and option, so a traceback through importlib adds nothing.
        raise AppNotFoundError(f"-A {path!r}: {type(exc).__name__}: {exc}") from None
    if attribute:
        app = getattr(module, attribute, None)
        if app is None:
            raise AppNotFoundError(f"-A {path!r}: module {module_name!r} has no {attribute!r}")
        if not isinstance(app, Cuebx):
            raise AppNotFoundError(
                f"-A {path!r}: {attribute!r} is a {type(app).__name__}, not a Cuebx app"
            )
        return app
    apps = {n: v for n, v in vars(module).items() if isinstance(v, Cuebx)}
    if len(apps) != 1:
        found = ", ".join(sorted(apps)) or "none"
        raise AppNotFoundError(
            f"-A {path!r}: expected exactly one Cuebx app in {module_name!r}, found {found}; "
            "name it as module:attribute"
        )
    return next(iter(apps.values()))
