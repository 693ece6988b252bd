"""Installs one start-up hook beside the package: `ham_mlx_mlx_lm.pth`.

mlx-lm's `load_prompt_cache` looks a file's cache classes up by name in `mlx_lm.models.cache`,
before any model (and so before ham_mlx) is imported, e.g. in `mlx_lm.generate
--prompt-cache-file`. The hook imports nothing at start-up: it only watches for that module and
adds ham_mlx's cache classes to it once mlx-lm imports it (ham_mlx/cache/mlx_lm_hook.py).
Everything else about the build is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "ham_mlx_mlx_lm.pth"
# A .pth line that starts with "import" is executed at start-up; errors must never surface there.
PTH_LINE = (
    "import sys; exec(\"def _ham_mlx_hook():\\n try:\\n"
    "  import importlib.util, os\\n"
    "  spec = importlib.util.find_spec('ham_mlx')\\n"
    "  path = os.path.join(os.path.dirname(spec.origin), 'cache', 'mlx_lm_hook.py')\\n"
    "  namespace = {'__name__': 'ham_mlx_mlx_lm_hook'}\\n"
    "  exec(compile(open(path).read(), path, 'exec'), namespace)\\n"
    "  namespace['install']()\\n"
    " except Exception:\\n  pass\\n_ham_mlx_hook()\")\n"
)


class BuildPyWithHook(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            (Path(self.build_lib) / PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib) / PTH_NAME)]


class _StrategyWithHook:
    """Wraps setuptools' editable strategy: the editable wheel gets the hook too."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE)


class EditableWheelWithHook(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithHook(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
