"""Where awqfx keeps what it computes once per machine: ``$AWQFX_CACHE``, else ``~/.cache/awqfx``."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$AWQFX_CACHE`` if set, else ``~/.cache/awqfx``."""
    env = os.environ.get("AWQFX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "awqfx"
