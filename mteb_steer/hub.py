"""Is the Hugging Face hub reachable? Asked once, before a hub download, so an offline user gets
one line at once instead of a minute of retries and a traceback."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

_HUB_HOST = ("huggingface.co", 443)
_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_offline_reason() -> str | None:
    """Why hub downloads cannot work here (`HF_HUB_OFFLINE` set, or the host unreachable), else None."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    try:
        with socket.create_connection(_HUB_HOST, timeout=_PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{_HUB_HOST[0]} is unreachable ({err.strerror or err})"


def hub_cache_has(repo_id: str, kind: str = "model") -> bool:
    """Whether the local hub cache holds a snapshot of `repo_id` (usable offline)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())
