"""Old module paths, from before the library was grouped into subpackages, keep importing with one warning line.

``import robust.loading`` (a script, a config's ``class_path: robust.optim.OneCycle``) gets the very module
``robust.models.resolve`` (the same classes, so ``isinstance`` and configs keep working) and a ``FutureWarning``
naming the new path. :data:`MOVED` is the one list of what moved where.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "images": "data.images",
    "eval_data": "data.eval_data",
    "archs": "models.archs",
    "card": "models.card",
    "hf": "models.hf",
    "loading": "models.resolve",
    "module": "training.module",
    "run_record": "training.run_record",
    "optim": "training.optim",
    "guard": "training.guard",
    "averaging": "training.averaging",
    "callbacks": "training.callbacks",
    "progress": "training.progress",
    "precision": "training.precision",
    "resume": "training.resume",
    "runfiles": "training.runfiles",
    "checkpointing": "training.checkpointing",
    "report": "evaluation.report",
    "render": "evaluation.render",
    "sharding": "evaluation.sharding",
    "fool": "evaluation.fool",
    "onnx_export": "export.onnx",
}

# the old flat modules that became packages of the same name: what they held now lives in this file of the package
BECAME_PACKAGES = {"data": "data.modules", "models": "models.build", "export": "export.folder"}


def current_path(dotted: str) -> str:
    """A dotted import path as the code names it now: ``robust.optim.OneCycle`` -> ``robust.training.optim.OneCycle``,
    ``robust.data.Digits`` -> ``robust.data.modules.Digits``; any other string is returned as it is. (A run saved
    before the move keeps resuming: its ``config.yaml`` names the old paths.)"""
    parts = dotted.split(".")
    if len(parts) < 3 or parts[0] != "robust":
        return dotted
    if parts[1] in MOVED:
        return ".".join(["robust", MOVED[parts[1]], *parts[2:]])
    if parts[1] in BECAME_PACKAGES and len(parts) == 3 and parts[2][:1].isupper():
        return f"robust.{BECAME_PACKAGES[parts[1]]}.{parts[2]}"
    return dotted


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``robust.<old>`` for every old name in :data:`MOVED` and loads it as its new module."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("robust.")
        if not fullname.startswith("robust.") or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder, replaced in sys.modules by the new module (the import returns what is there)

    def exec_module(self, module) -> None:
        new = f"robust.{MOVED[module.__name__.removeprefix('robust.')]}"
        warnings.warn(f"{module.__name__} is now {new}; import it from there", FutureWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
