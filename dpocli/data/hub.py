"""Hub ids to local folders: datasets and models from the local Hugging Face cache, offline-first.

A name is looked up in this order: an existing local path wins; otherwise a hub id (`ORG/NAME`
for datasets) is looked up in the local cache (the `huggingface_hub` snapshot layout,
`datasets--ORG--NAME/snapshots/<commit>/`, with `refs/<branch>` naming a commit). Only when the
snapshot is not there, the Hub is reachable and `HF_HUB_OFFLINE` is unset is it downloaded.

Invariants:
* The cache folder and offline mode are read from the environment at call time, not when
  `huggingface_hub` was imported (it freezes both into constants then), so they can be changed by
  the caller and by tests.
* Offline (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` true), nothing touches the network.
* Never a silent fallback: a missing repo or revision is a `DpocliError` (exit 2) naming the cache
  folder that was searched; a `revision` given for a local path is refused rather than ignored.
* A snapshot already in the cache is used as it is, also online (a branch is not re-checked).

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dpocli.errors import DpocliError

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's ENV_VARS_TRUE_VALUES
# `ORG/NAME`, as the Hub spells repo ids (huggingface_hub's validate_repo_id, org required).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w][\w.-]{0,95}")
_PLURAL = {"dataset": "datasets", "model": "models"}


@dataclass(frozen=True)
class Snapshot:
    """One revision of a repo in the local cache. `revision` is always the commit hash."""

    repo_id: str
    repo_type: str  # "dataset" or "model"
    revision: str
    path: Path  # .../snapshots/<revision>

    def relative(self, file: Path) -> str:
        """`file`'s path inside the repo (the same on every machine, unlike the cache folder)."""
        return Path(file).relative_to(self.path).as_posix()


def cache_dir() -> Path:
    """The hub cache folder, from the environment now: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE (legacy),
    HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub (huggingface_hub's order)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def offline() -> bool:
    env = os.environ
    return (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name


def repo_folder(repo_id: str, repo_type: str) -> Path:
    """Where the cache keeps `repo_id` (huggingface_hub's `repo_folder_name`)."""
    return cache_dir() / "--".join([_PLURAL[repo_type], *repo_id.split("/")])


def snapshot(repo_id: str, repo_type: str, revision: str | None = None) -> Snapshot:
    """`repo_id` at `revision` (default: main) from the local cache; downloaded first only when
    it is missing and the Hub may be used."""
    from huggingface_hub import snapshot_download

    where = repo_folder(repo_id, repo_type)
    kwargs = dict(repo_type=repo_type, revision=revision, cache_dir=cache_dir())
    try:
        return _snapshot(repo_id, repo_type, snapshot_download(repo_id, local_files_only=True, **kwargs))
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        pass
    at = f" at revision '{revision}'" if revision else ""
    if offline():
        # Say which part is missing: the repo, or only the revision asked for.
        missing = (
            f"has no revision '{revision}' in the local Hugging Face cache"
            if revision and where.is_dir()
            else f"is neither a local path nor a {repo_type}{at} in the local Hugging Face cache"
        )
        command = " ".join(
            ["hf download", repo_id]
            + (["--repo-type dataset"] if repo_type == "dataset" else [])
            + ([f"--revision {revision}"] if revision else [])
        )
        raise DpocliError(
            f"{missing} (searched {where}; HF_HUB_OFFLINE is set, so nothing was downloaded)",
            file=repo_id,
            hint=f"download it first ({command}), or unset HF_HUB_OFFLINE to let dpocli download it",
        )
    try:
        path = snapshot_download(repo_id, local_files_only=False, **kwargs)
    except Exception as err:  # network, auth, missing repo or revision: all mean "not available"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DpocliError(
            f"is neither a local path nor a {repo_type}{at} in the local Hugging Face cache (searched "
            f"{where}) and could not be downloaded ({type(err).__name__}: {reason})",
            file=repo_id,
            hint="check the id and revision, your network and HF_TOKEN; "
            "set HF_HUB_OFFLINE=1 to use the local cache only",
        ) from None
    return _snapshot(repo_id, repo_type, path)


def _snapshot(repo_id: str, repo_type: str, path: str) -> Snapshot:
    path = Path(path)
    return Snapshot(repo_id, repo_type, path.name, path)


def resolve_dataset(name: str, revision: str | None = None) -> tuple[Path, Snapshot | None]:
    """(folder or file to read, snapshot or None) for precompute's input argument: an existing
    local path as given, else the snapshot of the dataset repo `ORG/NAME`."""
    path = Path(name).expanduser()
    if path.exists():
        if revision is not None:
            raise DpocliError(
                f"is a local path, so --revision {revision} cannot be honoured",
                file=name,
                field="--revision",
                hint="--revision selects a commit, branch or tag of a Hub dataset; drop it for local files",
            )
        return path, None
    if not is_repo_id(name):
        raise DpocliError("does not exist (and is not a Hub dataset id of the form ORG/NAME)", file=name)
    found = snapshot(name, "dataset", revision)
    return found.path, found


def resolve_model(name: str, revision: str | None = None) -> tuple[Path, Snapshot | None]:
    """(model folder, snapshot or None): an existing local folder, else the snapshot of a model
    repo in the local cache (any id huggingface_hub accepts, `gpt2` included)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            raise DpocliError(
                f"is a local folder, so --model-revision {revision} cannot be honoured",
                file=name,
                field="--model-revision",
                hint="--model-revision selects a commit, branch or tag of a Hub model; "
                "drop it for local folders",
            )
        return path, None
    if path.exists():
        raise DpocliError("is a file, expected a model folder", file=name)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or ".." in name:
        raise DpocliError(
            "no such model folder (and not a Hub model id)",
            file=name,
            hint="pass a folder with config.json and weights, or ORG/NAME",
        )
    found = snapshot(name, "model", revision)
    return found.path, found
