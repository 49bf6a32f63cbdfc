"""Find a model the user named (a local folder or a hub id) or fail in one sentence that says what to do.

Left alone, transformers retries an unreachable hub for minutes and then raises a paragraph about local
directories. Here: a folder is loaded as a folder; a hub id is tried from the local cache first; the hub is
asked only when its host answers within seconds. Train loads its base model through this module too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

PROBE_TIMEOUT_S = 3.0


class ModelNotFound(Exception):
    """The model cannot be had here; the message is one sentence naming it and how to provide it."""


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host (HF_ENDPOINT, for mirrors) accepts a connection within `timeout` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or name.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth")))


def _how_to_provide(name: str) -> str:
    cache = os.environ.get("HF_HOME", str(Path("~/.cache/huggingface").expanduser()))
    return (
        f"download it on a machine with hub access (`hf download {name}`) and copy the folder here to pass "
        f"its path, or point HF_HOME at a cache that holds it (now {cache})"
    )


def load_model(name: str, load: Callable[..., T], what: str) -> T:
    """`load(source, local_files_only=...)` for a local folder or hub id `name`; `what` names it for the user.

    Raises ModelNotFound with one actionable sentence instead of a library traceback.
    """
    path = Path(name).expanduser()
    if path.exists():
        try:
            return load(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFound(f"{what} folder {path} could not be loaded ({first}); it must hold a complete "
                                "saved model: config, weights and processor/tokenizer files") from None
    if _looks_like_path(name):
        raise ModelNotFound(f"{what} {name!r} not found: there is no such file or folder; pass the checkpoint "
                            "file or the folder that holds a downloaded copy, or a hub id such as 'owner/model'")
    try:
        return load(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    if _offline() or not hub_reachable():
        why = "offline mode is set (HF_HUB_OFFLINE)" if _offline() else "the Hugging Face hub cannot be reached from here"
        raise ModelNotFound(f"{what} {name!r} is not in the local cache and {why}: {_how_to_provide(name)}")
    try:
        return load(name)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(f"{what} {name!r} could not be loaded from the hub ({first}); check the id, or "
                            f"{_how_to_provide(name)}") from None
