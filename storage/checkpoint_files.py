"""Checkpoint files: read and verify weights from any fsspec URL, save trained ones.

The byte side of the checkpoints; fitting tensors to a module (config resolution, key and shape checks)
is ``copgen.checkpoints`` in the core, and ``copgen.flows.models.load_network``/``load_autoencoder``
join the two.

- Sources: a local path, ``file://``, ``s3://`` (``storage_options`` go to s3fs), ``hf://<repo>/<file>``
  (huggingface_hub's filesystem), or any other fsspec protocol.
- Formats: ``.safetensors``, or torch pickles (``.pth``/``.pt``/``.ckpt``) loaded with
  ``torch.load(weights_only=True)`` only: a file that needs arbitrary code to load is refused. The format is
  sniffed from the first bytes, so a misnamed file still loads (or fails with a clear error).
- Wrappers: a pickle holding ``{"state_dict": {...}}`` or ``{"model": {...}}`` is unwrapped, and a
  ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile) prefix carried by *every* key is
  stripped; nothing else is guessed.
- Memory: remote files are streamed to a temporary file (hashed on the way) and then memory-mapped, local
  files are memory-mapped directly (safetensors, zip-format pickles).
- Saved checkpoints are safetensors with the model config as JSON under the metadata key ``config``
  (``copgen.configs.CONFIG_KEY``) and a ``<name>.json`` sidecar ``{"config": ..., "metadata": ...}``.
- Every failure is a ``CheckpointError`` naming the file: unreadable, corrupted or truncated files, a
  sha256 mismatch, refused pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from copgen.checkpoints import SHOW_KEYS, Checkpoint, CheckpointError
from copgen.configs import CONFIG_KEY, ModelConfig
from copgen.errors import describe_error as _describe
from copgen.errors import redact_url
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

__all__ = [
    "CheckpointError",
    "open_state_dict",
    "read_checkpoint",
    "save_checkpoint",
    "sha256_of",
]

CHUNK_BYTES = 16 * 2**20
_WRAPPER_KEYS = ("state_dict", "model")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def read_checkpoint(
    url: str | os.PathLike, *, sha256: str | None = None, storage_options: Mapping[str, Any] | None = None,
    sidecars: bool = True,
) -> Checkpoint:
    """The tensors, header metadata and sha256 of the checkpoint at ``url`` and, with ``sidecars``, the
    JSON objects beside it that may hold its config (``<name>.json``, then ``config.json``)."""
    url = str(url)
    ckpt = _read(url, sha256, storage_options)
    if sidecars:
        ckpt.sidecars = _sidecars(url, storage_options)
    return ckpt


def _sidecars(url: str, storage_options: Mapping[str, Any] | None) -> tuple[tuple[str, dict, bool], ...]:
    fs, path = _filesystem(url, storage_options)
    weights = PurePosixPath(path)
    out = []
    for candidate, specific in ((weights.with_name(f"{weights.stem}.json"), True),
                                (weights.with_name("config.json"), False)):
        if str(candidate) == str(weights):
            continue
        shown = _sibling_url(url, weights, candidate)
        doc = _read_json_config(fs, str(candidate), shown)
        if doc is not None:
            out.append((shown, doc, specific))
            if specific:  # it wins over a folder's config.json, which is then not read at all
                break
    return tuple(out)


def open_state_dict(
    url: str | os.PathLike, *, sha256: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Tensor]:
    """Read a state dict (name -> CPU tensor) from ``url``; verify ``sha256`` (hex) when given."""
    return _read(str(url), sha256, storage_options).state_dict


def sha256_of(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> str:
    """SHA-256 (hex) of the file at ``url``, streamed in chunks (for provenance)."""
    url = str(url)
    fs, path = _filesystem(url, storage_options)
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as stream:
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
    except Exception as exc:
        shown = redact_url(url)
        raise CheckpointError(f"cannot read {shown}: {_describe(exc)}", source=shown) from exc
    return digest.hexdigest()


def _read(url: str, sha256: str | None, storage_options: Mapping[str, Any] | None) -> Checkpoint:
    shown = redact_url(url)
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise CheckpointError(f"sha256 for {shown} must be 64 hex digits, got {sha256!r}", source=shown)
    fs, path = _filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        digest = sha256_of(path) if sha256 is not None else None
        _verify(digest, sha256, shown)
        return _load_local(Path(path), shown, digest)
    # Stream to a temporary file while hashing, then memory-map it: the bytes are never held twice.
    with tempfile.TemporaryDirectory(prefix="copgen-ckpt-", ignore_cleanup_errors=True) as tmp:
        local = Path(tmp) / (PurePosixPath(path).name or "checkpoint")
        digest = _download(fs, path, local, shown)
        _verify(digest, sha256, shown)
        # The mapping outlives the deleted file (POSIX), so the tensors stay valid after cleanup.
        return _load_local(local, shown, digest)


def _filesystem(url: str, storage_options: Mapping[str, Any] | None):
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except Exception as exc:
        shown = redact_url(url)
        raise CheckpointError(f"cannot open {shown}: {_describe(exc)}", source=shown) from exc


def _download(fs, path: str, local: Path, shown: str) -> str:
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as src, open(local, "wb") as dst:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
    except Exception as exc:
        raise CheckpointError(f"cannot read {shown}: {_describe(exc)}", source=shown) from exc
    return digest.hexdigest()


def _verify(actual: str | None, expected: str | None, shown: str) -> None:
    if expected is not None and actual != expected.lower():
        raise CheckpointError(
            f"sha256 mismatch for {shown}: expected {expected.lower()}, got {actual}", source=shown
        )


def _load_local(path: Path, shown: str, digest: str | None) -> Checkpoint:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CheckpointError(f"cannot read {shown}: {_describe(exc)}", source=shown) from exc
    # safetensors first: its 8-byte header length may itself start with 0x80, like a pickle.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        state_dict, metadata = _safetensors_load(path, shown)
        return Checkpoint(shown, _strip_prefix(state_dict), metadata, digest)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        obj = _torch_load(path, shown, mmap=head.startswith(b"PK"))
        return Checkpoint(shown, _unwrap(obj, shown), {}, digest)
    raise CheckpointError(
        f"{shown} is neither a safetensors file nor a torch checkpoint ({size} bytes; corrupted or "
        "truncated?)",
        source=shown,
    )


def _safetensors_load(path: Path, shown: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:
        raise CheckpointError(
            f"corrupted or truncated safetensors file {shown}: {_describe(exc)}", source=shown
        ) from exc
    return tensors, metadata


def _unpickling_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused (e.g. "unsupported GLOBAL posix.getcwd"), without its
    advice to retry with ``weights_only=False`` (which would run the file's code)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    found = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln]
    text = " ".join(found) or "the file references objects outside the allowed tensor types"
    return text.replace("Trying to load ", "").rstrip(".")


def _torch_load(path: Path, shown: str, *, mmap: bool) -> Any:
    try:
        if path.suffix == ".safetensors":
            # torch.load would hand a path with this suffix to safetensors: give it the bytes instead.
            with open(path, "rb") as stream:
                return torch.load(stream, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"refused to load {shown}: it needs arbitrary code to unpickle, and checkpoints are only "
                f"loaded with torch.load(weights_only=True). Convert it to safetensors from a trusted "
                f"environment. ({_unpickling_reason(exc)})",
                source=shown,
            ) from None  # torch's own text suggests weights_only=False: never repeat that advice
        raise CheckpointError(f"corrupted torch checkpoint {shown}: {_describe(exc)}", source=shown) from exc
    except Exception as exc:
        raise CheckpointError(
            f"corrupted or truncated torch checkpoint {shown}: {_describe(exc)}", source=shown
        ) from exc


def _unwrap(obj: Any, shown: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        kind = type(obj).__name__
        keys = list(obj)[:SHOW_KEYS] if isinstance(obj, Mapping) else []
        raise CheckpointError(
            f"{shown} does not hold a state dict of tensors (found {kind}"
            + (f" with keys {keys}" if keys else "")
            + f"; wrappers understood: {list(_WRAPPER_KEYS)})",
            source=shown,
        )
    return _strip_prefix(dict(obj))


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _strip_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _STRIPPED_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _read_json_config(fs, path: str, shown: str) -> dict[str, Any] | None:
    try:
        if not fs.exists(path):
            return None
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise CheckpointError(f"cannot read config {shown}: {_describe(exc)}", source=shown) from exc
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"config {shown} is not valid JSON: {exc}", source=shown) from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"config {shown} must be a JSON object", source=shown)
    return doc


def _sibling_url(url: str, weights: PurePosixPath, sibling: PurePosixPath) -> str:
    """The URL of a file beside the weights, for messages (keeps the protocol)."""
    shown = redact_url(url)
    if shown.endswith(weights.name):
        return shown[: len(shown) - len(weights.name)] + sibling.name
    return str(sibling)



# --- saving ---------------------------------------------------------------------------------------


def _sort_header_metadata(path: Path) -> None:
    """Put the safetensors header's ``__metadata__`` entries in key order, so that the same weights and
    metadata always give the same file bytes (and sha256): safetensors writes that map in hash order,
    which changes from process to process. Tensor entries and data are left as written."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        metadata = header.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to 8-byte alignment
        if len(text) == size:  # the usual case: the same entries reordered, same length
            f.seek(8)
            f.write(text)
            return
    moved = path.with_suffix(".unsorted")
    path.rename(moved)
    with open(moved, "rb") as src, open(path, "wb") as dst:
        src.seek(8 + size)
        dst.write(struct.pack("<Q", len(text)) + text)
        shutil.copyfileobj(src, dst, 1 << 24)
    moved.unlink()


def save_checkpoint(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike,
    config: ModelConfig | Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``state_dict`` as safetensors at ``path`` (any fsspec URL) with ``config`` (a
    ``TriffuserConfig``/``AutoencoderConfig`` or its dict) in the header under ``config`` and in
    ``<name>.json`` beside it (``{"config": ..., "metadata": ...}``); returns the file's sha256.

    Written to a temporary file first and moved/uploaded whole, so a crash never leaves a partial file
    under the final name.
    """
    from safetensors.torch import save_file

    url = str(path)
    shown = redact_url(url)
    if not url.endswith(".safetensors"):
        raise CheckpointError(f"checkpoints are saved as .safetensors, got {shown}", source=shown)
    config = config.to_dict() if isinstance(config, ModelConfig) else dict(config)
    header = {CONFIG_KEY: json.dumps(config), "format": "pt"}
    header.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    sidecar = json.dumps({CONFIG_KEY: config, "metadata": dict(metadata or {})}, indent=1, default=str)
    fs, fs_path = _filesystem(url, storage_options)
    weights = PurePosixPath(fs_path)
    json_path = str(weights.with_name(weights.name[: -len(".safetensors")] + ".json"))
    try:
        with tempfile.TemporaryDirectory(prefix="copgen-save-") as tmp:
            local = Path(tmp) / weights.name
            save_file(tensors, str(local), metadata=header)
            _sort_header_metadata(local)
            digest = sha256_of(local)
            fs.makedirs(str(weights.parent), exist_ok=True)
            fs.put_file(str(local), fs_path)
            fs.pipe_file(json_path, sidecar.encode())
    except Exception as exc:
        raise CheckpointError(f"cannot save {shown}: {_describe(exc)}", source=shown) from exc
    return digest
