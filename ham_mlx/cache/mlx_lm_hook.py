"""Let mlx-lm's `load_prompt_cache` find ham_mlx's cache classes.

mlx-lm resolves a prompt-cache file's class names in the globals of `mlx_lm.models.cache`. Once
that module is imported (now or later; importing it costs seconds, so it is never imported for
this), ham_mlx's classes are added there, under their own names, which mlx-lm does not use.

`import ham_mlx` installs it, and so does the start-up file `ham_mlx_mlx_lm.pth` that setup.py
puts beside the package: it runs this file on its own (without importing ham_mlx) so that a fresh
`mlx_lm.generate --prompt-cache-file` finds the classes. Only the standard library is imported at
module level.
"""

from __future__ import annotations

import importlib.abc
import sys

TARGET = "mlx_lm.models.cache"


def _register(module) -> None:
    from ham_mlx.cache.files import CACHE_CLASSES

    for name, cls in CACHE_CLASSES.items():
        if getattr(module, name, cls) is cls:
            setattr(module, name, cls)


class _Finder(importlib.abc.MetaPathFinder):
    """Registers the classes right after mlx-lm's cache module is executed."""

    ham_mlx_cache_hook = True  # one finder per process, whichever copy of this file installed it

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_register(module, _exec=exec_module):
                    _exec(module)
                    _register(module)

                spec.loader.exec_module = exec_and_register
                return spec
        return None


def install() -> None:
    if TARGET in sys.modules:
        _register(sys.modules[TARGET])
    elif not any(getattr(f, "ham_mlx_cache_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
