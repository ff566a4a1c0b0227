"""Where the data sets are: ``$ROBUST_DATA`` (:data:`DATA_ENV`), read here only.

- :func:`data_root` (data modules' default root) and :func:`shared_data_dir` (tests, benchmarks, experiments).
- :func:`resolve_data_root`: a config's data folder as given, else under ``$ROBUST_DATA``; a missing folder is one
  line naming the flag to set.
"""

from __future__ import annotations

import os
from pathlib import Path

from robust.errors import RobustError

DATA_ENV = "ROBUST_DATA"


def data_root(default: str = "data") -> str:
    """Where data sets live when no root is given: ``$ROBUST_DATA`` if set, else ``default``."""
    return os.environ.get(DATA_ENV) or default


def shared_data_dir() -> Path:
    """Test/benchmark data: ``$ROBUST_DATA`` if set, else ``../shared/data`` beside the project root."""
    return Path(data_root(str(Path(__file__).resolve().parents[2].parent / "shared" / "data")))


def resolve_data_root(root: str | None, downloads: bool = False) -> tuple[str | None, str | None]:
    """The data folder to use for a config's ``root``, and a one-line notice when it was found under
    ``$ROBUST_DATA``: ``root`` itself when it exists; else ``$ROBUST_DATA/<root's last part>`` when that exists; else,
    for data that ``downloads`` itself (CIFAR-10), ``root`` unchanged; else an error naming the flag to set."""
    if root is None or Path(root).exists():
        return root, None
    name = Path(root).name
    env = os.environ.get(DATA_ENV)
    if env and (Path(env) / name).exists():
        found = str(Path(env) / name)
        return found, f"data: {root} is not here; using {found} (from ${DATA_ENV})"
    if downloads:
        return root, None
    where = f"${DATA_ENV} ({env}) holds no {name}/" if env else f"${DATA_ENV} is not set"
    raise RobustError(
        f"the data folder {root} does not exist and {where}: pass --data.init_args.root "
        f"/path/to/{name}, or set {DATA_ENV} to the folder that holds {name}/"
    )
