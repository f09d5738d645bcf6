"""Run a Python program as on a machine without the ``engine`` extra (no torch, ...).

Usage (what tests/test_no_torch.py runs when no torch-free venv is given)::

    python tests/support/no_engine.py -m bridge.cli segment ...
    python tests/support/no_engine.py path/to/program.py ARGS...

An import hook first on ``sys.meta_path`` makes every module of
:data:`HIDDEN` (the engine and onnx extras) absent: importing one raises ``ModuleNotFoundError``
with its ``name``, exactly what Python raises for a package that is not
installed, so the program cannot tell the difference.  ``make test-no-torch``
runs the same tests in a real venv without the engine extra.
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys

# What only `pip install 'nuclick-bridge[engine]'` brings (pyproject.toml); = bridge.cli.ENGINE_MODULES.
ENGINE_MODULES = frozenset({"torch", "grpc_reflection", "prometheus_client"})
# A client install lacks the `onnx` extra (--backend onnxruntime) too.
HIDDEN = ENGINE_MODULES | {"onnx", "onnxruntime"}


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def install() -> None:
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ENGINE_MODULES)
    if loaded:
        raise RuntimeError(f"already imported: {', '.join(loaded)}")
    sys.meta_path.insert(0, _Absent())


if __name__ == "__main__":
    install()
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
