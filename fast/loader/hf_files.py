"""The files around a Hugging Face checkpoint: the shard index, and the local hub cache.

**Sharded safetensors.** A checkpoint split into shards has ``model.safetensors.index.json``,
whose ``weight_map`` names the shard of every tensor. :func:`read_weight_map` checks that every
shard it names is there, :func:`check_index_covers` that it places every weight the model
needs, and :func:`check_shard` that a shard holds the tensors the index places in it; each
failure raises :class:`ShardedCheckpointError` naming the files and tensors.

**The Hugging Face cache.** ``huggingface_hub`` stores a download of ``org/name`` as
``<cache>/models--org--name/snapshots/<commit>/`` (files linked to ``blobs/``), with the commit
of branch ``main`` in ``refs/main``. :func:`find_snapshot` finds that directory without the
network and without ``huggingface_hub``; ``<cache>`` is ``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (:func:`hub_cache_dir`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path

__all__ = [
    "INDEX_FILE",
    "ShardedCheckpointError",
    "check_index_covers",
    "check_shard",
    "find_snapshot",
    "hub_cache_dir",
    "is_repo_id",
    "read_weight_map",
]

INDEX_FILE = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class ShardedCheckpointError(ValueError):
    """The shard index of a checkpoint does not match its files or the model.

    ``index`` is the index file, ``names`` the missing shards or uncovered tensors.
    """

    def __init__(self, index: Path, names: Collection[str], reason: str) -> None:
        shown = sorted(names)
        listed = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
        super().__init__(f"{index}: {reason}: {listed}")
        self.index, self.names = index, shown


def read_weight_map(root: Path) -> dict[str, str] | None:
    """Tensor name -> shard file name from ``root``'s index; None when there is no index.

    Raises :class:`ShardedCheckpointError` when the index is malformed or names a shard that
    is not in ``root``.
    """
    index = root / INDEX_FILE
    if not index.is_file():
        return None
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardedCheckpointError(index, [], f"not valid JSON ({e})") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ShardedCheckpointError(
            index, [], "no 'weight_map' object of tensor name -> shard file"
        )
    missing = {s for s in weight_map.values() if not (root / s).is_file()}
    if missing:
        raise ShardedCheckpointError(index, missing, f"shard files missing from {root}")
    return weight_map


def check_index_covers(root: Path, weight_map: Mapping[str, str], needed: Collection[str]) -> None:
    """Raise :class:`ShardedCheckpointError` naming the ``needed`` weights in no shard."""
    uncovered = set(needed) - set(weight_map)
    if uncovered:
        raise ShardedCheckpointError(
            root / INDEX_FILE, uncovered, f"{len(uncovered)} weights of the model are in no shard"
        )


def check_shard(
    root: Path, weight_map: Mapping[str, str], shard: str, held: Collection[str]
) -> None:
    """Raise :class:`ShardedCheckpointError` naming the tensors the index places in ``shard``
    that it does not hold."""
    absent = {name for name, s in weight_map.items() if s == shard} - set(held)
    if absent:
        raise ShardedCheckpointError(
            root / INDEX_FILE, absent, f"tensors the index places in {shard} are not in it"
        )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, from the environment as ``huggingface_hub`` reads it.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"HF_HUB_CACHE": "/data/hub"}):
    ...     str(hub_cache_dir())
    '/data/hub'
    >>> with mock.patch.dict(os.environ, {"HF_HOME": "/data/hf"}):
    ...     os.environ.pop("HF_HUB_CACHE", None), os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
    ...     str(hub_cache_dir())
    (...)
    '/data/hf/hub'
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        home = str(Path(xdg) / "huggingface")
    return Path(home).expanduser() / "hub"


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub model id (``name`` or ``org/name``).

    >>> is_repo_id("HuggingFaceTB/SmolLM2-135M"), is_repo_id("/models/x"), is_repo_id("a/b/c")
    (True, False, False)
    """
    return bool(_REPO_ID.match(name)) and ".." not in name


def find_snapshot(repo_id: str, revision: str = "main") -> tuple[Path | None, list[str]]:
    """(the snapshot directory of ``repo_id`` at ``revision``, or None; what was looked at).

    ``revision`` is a branch or tag with a file under ``refs/``, or a commit with a snapshot.
    The second element lists each path looked at and why it did not do, for an error message.
    """
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        return None, [f"{repo} (no such directory)"]
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        snapshot = repo / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot, [str(snapshot)]
        return None, [f"{ref} -> {commit}", f"{snapshot} (no such directory)"]
    snapshot = repo / "snapshots" / revision
    if snapshot.is_dir():
        return snapshot, [str(snapshot)]
    return None, [f"{ref} (no such file)", f"{snapshot} (no such directory)"]
