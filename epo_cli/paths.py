"""Where the toolkit keeps what it makes: the model and data cache, the runs and checkpoints."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EPO_CACHE_DIR``, else ``~/.cache/epo``."""
    return Path(os.environ.get("EPO_CACHE_DIR", Path.home() / ".cache" / "epo"))


def epo_home() -> Path:
    """``$EPO_HOME``, else ``~/.epo``: the default MLflow store and checkpoint root (absolute)."""
    return Path(os.environ.get("EPO_HOME") or Path.home() / ".epo").expanduser().absolute()


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a hidden temporary file beside it: never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    staging.replace(path)
