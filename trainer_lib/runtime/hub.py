"""Where a model comes from, found out in a second or two: a local folder, the hub's local cache,
or the hub itself when it can be reached; and the one check of whether to stay offline.
"""

from __future__ import annotations

import functools
import os
import re
import time

from trainer_lib.errors import ConfigError

# a hub repository id: "name" or "owner/name" (letters, digits, "-", "_", ".")
_REPO_ID = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")
HUB_CHECK_TIMEOUT = 3.0  # seconds


def hub_offline(datasets: bool = False) -> bool:
    """Whether the environment says not to reach the hub (for datasets too, with `datasets`)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets
                                                          else ())
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in names)


def hub_reachable() -> tuple[bool, str]:
    """(whether the hub answers, what failed): one request with a short timeout, through the
    same client and proxies huggingface_hub uses; asked once per process and endpoint."""
    from huggingface_hub import constants

    return _reachable(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str) -> tuple[bool, str]:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_CHECK_TIMEOUT)
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure to get an answer is "unreachable"
        return False, f"{type(e).__name__}: {e}"


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` reads as a hub repository id ("name" or "owner/name") rather than a path."""
    return (not text.startswith(("/", "./", "../", "~", ".\\")) and not os.path.isabs(text)
            and bool(_REPO_ID.fullmatch(text)))


def model_source(path: str, setting: str, probe_files: tuple = ("config.json",)) -> dict:
    """Checks where `path` (the value of `setting`) points before anything is loaded; returns
    extra `from_pretrained` arguments (`local_files_only` when the hub is unreachable but the
    files are cached)."""
    if os.path.isdir(path):
        return {}
    expanded = os.path.expanduser(path)
    local = (path.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(expanded)
             or os.path.exists(expanded) or not _REPO_ID.fullmatch(path))
    if local:
        what = "is a file, not a model folder" if os.path.isfile(expanded) else "does not exist"
        raise ConfigError(f"{setting}={path!r}: this local path {what}; give an existing folder "
                          "(as written by save_pretrained) or a Hugging Face hub id (owner/name)")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(path, f), str) for f in probe_files)
    if hub_offline():
        if cached:
            return {}
        raise ConfigError(f"{setting}={path!r} is a hub id, but HF_HUB_OFFLINE is set and it is "
                          "not in the local cache; download it beforehand (`hf download "
                          f"{path}`) with the network on, or give a local folder")
    start = time.monotonic()
    reachable, why = hub_reachable()
    if reachable:
        return {}
    if cached:
        return {"local_files_only": True}  # use the cached copy without asking the hub
    raise ConfigError(
        f"{setting}={path!r} is a hub id, but the Hugging Face hub ({constants.ENDPOINT}) cannot "
        f"be reached ({why}; checked in {time.monotonic() - start:.1f} s) and it is not in the "
        f"local cache. Connect to the network, download it beforehand (`hf download {path}`), "
        "or give a local folder; with HF_HUB_OFFLINE=1 only the cache is used")
