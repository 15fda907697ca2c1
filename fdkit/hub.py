"""Where the model a config names is: an existing folder, or a hub id (ORG/NAME) found in
$FDKIT_MODEL_DIR/NAME, then in the Hugging Face cache, else downloaded into that cache.

The LLM front calls `resolve_model` before it builds an engine, so a notebook's
`LLM("baidu/ERNIE-4.5-0.3B-Paddle")` and the server resolve alike; composing a config never downloads,
and the engine only ever reads a local folder (it writes no files). A download fetches config.json
first and hands it to `before_weights` (the memory plan), so a model that cannot fit is refused before
its weights are fetched. huggingface_hub's own settings apply: HF_ENDPOINT (another endpoint),
HF_HUB_OFFLINE=1 (no network), HF_HOME (where its cache is); FDKIT_MODEL_DIR defaults to ~/models.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local folder nor to be had from the hub; the message says how to get it."""


def model_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("FDKIT_MODEL_DIR") or "~/models"))


def is_hub_id(spec: str) -> bool:
    return HUB_ID.fullmatch(spec) is not None and ".." not in spec


def resolve_model(
    spec: str | Path,
    download: bool = True,
    revision: str | None = None,
    before_weights: Callable[[Path], object] | None = None,
) -> Path:
    """The local folder of `spec`: an existing path always wins; an ORG/NAME id is looked up locally,
    then downloaded if `download` (ModelNotFoundError, in one line, if it cannot be)."""
    spec = str(spec)
    folder = Path(os.path.expanduser(spec))
    if folder.is_dir():
        return folder.resolve()
    if not is_hub_id(spec):
        raise ModelNotFoundError(
            f"model folder not found: {spec} (model.path / --model takes an existing folder, or a hub "
            "id ORG/NAME such as baidu/ERNIE-4.5-0.3B-Paddle)"
        )
    return find_local_copy(spec, revision) or _download(spec, download, revision, before_weights)


def find_local_copy(repo_id: str, revision: str | None = None) -> Path | None:
    """$FDKIT_MODEL_DIR/NAME if it holds a config.json, else a complete snapshot in the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    folder = model_dir() / repo_id.split("/")[1]
    if (folder / "config.json").is_file():
        return folder.resolve()
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:  # not cached, or only partly (an interrupted download)
        return None


def fetch_command(repo_id: str) -> str:
    return f"hf download {repo_id} --local-dir {model_dir() / repo_id.split('/')[1]}"


def _download(
    repo_id: str, download: bool, revision: str | None, before_weights: Callable[[Path], object] | None
) -> Path:
    import httpx
    from huggingface_hub import constants, snapshot_download

    missing = f"model {repo_id} is not in {model_dir()} nor in the Hugging Face cache"
    if not download or constants.is_offline_mode():
        why = "downloads are off (model.download=false)" if not download else "HF_HUB_OFFLINE is set"
        raise ModelNotFoundError(f"{missing} and {why}; fetch it with: {fetch_command(repo_id)}")
    endpoint = constants.ENDPOINT  # HF_ENDPOINT when set
    logger.info("downloading %s from %s into the Hugging Face cache", repo_id, endpoint)
    try:
        if before_weights is not None:
            before_weights(
                Path(snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"]))
            )
        return Path(snapshot_download(repo_id, revision=revision))
    except (OSError, httpx.HTTPError) as exc:
        cause = exc.__cause__ or exc  # huggingface_hub wraps a connection error
        reason = " ".join(str(cause).split())[:300]
        raise ModelNotFoundError(
            f"{missing} and downloading it from {endpoint} failed ({type(cause).__name__}: {reason}); "
            f"fetch it with: {fetch_command(repo_id)}"
        ) from exc
