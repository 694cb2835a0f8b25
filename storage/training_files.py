"""The files a training run keeps beside its checkpoints (byte I/O only; ``copgen.flows.train`` decides
what goes in them).

``<name>_train_state.pt``: raw weights, EMA, optimiser, step, RNG, data order and loss history, what a
resumed run continues from; written whole under a temporary name and moved (never a partial file), read
with ``torch.load(weights_only=True)`` (an untrusted file cannot run code). ``training.json``: one entry
per model, updated in place.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import torch
from copgen.errors import TrainingError
from copgen.storage import fsutil

TRAINING_JSON = "training.json"


def state_url(out_dir: str, name: str) -> str:
    return fsutil.join_url(out_dir, f"{name}_train_state.pt")


def save_state(url: str, state: Mapping[str, Any], storage_options) -> None:
    fs, path = fsutil.url_to_fs(url, storage_options)
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = path + ".tmp"
    fs.pipe_file(tmp, buf.getvalue())
    fs.mv(tmp, path)  # whole file under the final name, never a partial one


def load_state(url: str, storage_options) -> dict[str, Any] | None:
    """The saved state at ``url``, None when there is none."""
    fs, path = fsutil.url_to_fs(url, storage_options)
    if not fs.exists(path):
        return None
    try:
        return torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise TrainingError(f"cannot read training state {fsutil.redact_url(url)}: {exc}") from exc


def update_training_json(out_dir: str, name: str, entry: Mapping[str, Any], storage_options) -> None:
    """Set ``name``'s entry of ``<out_dir>/training.json`` (an unreadable file starts afresh)."""
    fs, path = fsutil.url_to_fs(fsutil.join_url(out_dir, TRAINING_JSON), storage_options)
    doc: dict[str, Any] = {}
    if fs.exists(path):
        try:
            doc = json.loads(fs.cat_file(path))
        except ValueError:
            doc = {}
    doc[name] = dict(entry)
    fs.pipe_file(path, json.dumps(doc, indent=1, default=str).encode())


__all__ = ["TRAINING_JSON", "load_state", "save_state", "state_url", "update_training_json"]
