"""Pretrained parts from a local folder or the Hugging Face hub: the dense networks of the diffusers
families (igsm.families) and the frozen parts of latent and text-conditioned experiments (igsm.latents'
autoencoders). Offline, the hub client retries for about a minute before it fails: it is asked only
where it answers, and a failure names the source and how to get it onto the machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set (huggingface_hub's own switch): never try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = 5.0) -> bool:
    import socket
    from urllib.parse import urlparse

    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def looks_like_local_path(model_id: str) -> bool:
    """A path rather than a hub id: absolute, ./ ../ ~ in front, or a first component that is a
    folder here (hub ids are ``owner/name``, and ``owner`` is rarely a local folder)."""
    separators = [s for s in (os.sep, os.altsep) if s]
    if os.path.isabs(model_id) or model_id.startswith("~") or model_id in (".", ".."):
        return True
    if any(model_id.startswith(prefix + s) for prefix in (".", "..") for s in separators):
        return True
    return any(sep in model_id and Path(model_id.split(sep)[0]).is_dir() for sep in separators)


def load_local_or_hub(load: Callable, source: str, *, subfolders: tuple[str, ...], key: str, what: str,
                      cache_dir=None, marker: str = "config.json"):
    """``load(path_or_id, local_files_only=…, cache_dir=…[, subfolder=…])`` (a diffusers or
    transformers ``from_pretrained``) from a local folder (the part's own, or a pipeline's holding it
    in one of ``subfolders``, where its ``marker`` file is) or a hub id, the hub cache first.
    ``ValueError`` naming ``key`` (the config key), ``what`` the part is, each attempt's error and
    what to do offline."""
    local = Path(source).expanduser()
    where = local if local.is_dir() else None
    if where is None and looks_like_local_path(source):
        raise ValueError(f"{key}: local folder {source} does not exist")
    tried = [sub for sub in subfolders if where is None or (local / sub / marker).is_file()]
    if where is not None and not tried:
        inside = " nor ".join(f"{sub}/{marker}" if sub else marker for sub in subfolders)
        raise ValueError(f"{key}: local folder {source} holds no {what} (neither {inside})")
    errors = []
    online = where is None and hub_reachable()
    for local_only in (True, False) if online else (True,):
        for sub in tried:
            try:
                return load(str(local) if where else source, local_files_only=local_only, cache_dir=cache_dir,
                            **({"subfolder": sub} if sub else {}))
            except Exception as err:  # diffusers and transformers raise OSError, ValueError, …
                errors.append(f"{sub or '.'}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if where is None and not online:
        errors.append("HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub is unreachable")
    raise ValueError(f"{key}: could not load the {what} from {source} ({'; '.join(errors[-2:])}); without "
                     f"internet, download it elsewhere (`hf download {source} --local-dir DIR`), copy DIR here "
                     f"and set {key} to it")
