"""Load and verify network / autoencoder weights from any fsspec URL; save trained ones.

- Sources: a local path, ``file://``, ``s3://`` (``storage_options`` go to s3fs), ``hf://<repo>/<file>``
  (huggingface_hub's filesystem), or any other fsspec protocol.
- Formats: ``.safetensors``, or torch pickles (``.pth``/``.pt``/``.ckpt``) loaded with
  ``torch.load(weights_only=True)`` only: a file that needs arbitrary code to load is refused. The format is
  sniffed from the first bytes, so a misnamed file still loads (or fails with a clear error).
- Wrappers: a pickle holding ``{"state_dict": {...}}`` or ``{"model": {...}}`` is unwrapped, and a
  ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile) prefix carried by *every* key is
  stripped; nothing else is guessed.
- Memory: remote files are streamed to a temporary file (hashed on the way) and then memory-mapped, local
  files are memory-mapped directly (safetensors, zip-format pickles); modules are built on the meta device
  and take the loaded tensors without a copy, so the release network (1.1 GB) costs one copy, two while
  converting ``dtype``.
- Every failure is a ``CheckpointError`` naming the file: unreadable, corrupted or truncated files, a
  sha256 mismatch, refused pickles, and state dicts that do not fit (missing, unexpected and wrong-shape
  keys, first few of each with counts).

This module reads bytes, which DESIGN §2 otherwise keeps out of the core: it is the one place where the
model's own files are handled, so that a worker needs nothing but a URL to rebuild its model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from copgen.autoencoder import (
    RELEASE_DDCONFIG,
    RELEASE_EMBED_DIM,
    RELEASE_SCALE_FACTOR,
    AutoencoderKL,
    convert_diffusers_to_ldm,
    is_diffusers_layout,
)
from copgen.errors import CopgenError, redact_url
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "load_autoencoder",
    "load_into",
    "load_network",
    "open_state_dict",
    "save_checkpoint",
    "sha256_of",
]

CHUNK_BYTES = 16 * 2**20
SHOW_KEYS = 5  # how many keys of each kind an error message lists
_WRAPPER_KEYS = ("state_dict", "model")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class CheckpointError(CopgenError, RuntimeError):
    """A checkpoint could not be read, verified or loaded; ``source`` is the URL or path concerned."""

    def __init__(self, message: str, *, source: str = "") -> None:
        super().__init__(message)
        self.source = source


@dataclass
class CheckpointInfo:
    """Where a loaded module's weights came from (attached as ``module.checkpoint_info``)."""

    url: str
    config: dict[str, Any]
    config_source: str  # "explicit", a JSON URL, "safetensors header" or "release"
    sha256: str | None = None  # known when verified or computed while downloading
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata


@dataclass
class _Loaded:
    state_dict: dict[str, Tensor]
    metadata: dict[str, str]
    sha256: str | None


# --- reading ------------------------------------------------------------------------------------------


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


def _read(url: str, sha256: str | None, storage_options: Mapping[str, Any] | None) -> _Loaded:
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


def _load_local(path: Path, shown: str, digest: str | None) -> _Loaded:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CheckpointError(f"cannot read {shown}: {_describe(exc)}", source=shown) from exc
    # safetensors first: its 8-byte header length may itself start with 0x80, like a pickle.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        state_dict, metadata = _safetensors_load(path, shown)
        return _Loaded(_strip_prefix(state_dict), metadata, digest)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        obj = _torch_load(path, shown, mmap=head.startswith(b"PK"))
        return _Loaded(_unwrap(obj, shown), {}, digest)
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


# --- fitting a module ---------------------------------------------------------------------------------


def load_into(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "", assign: bool = False):
    """Strictly load ``state_dict`` into ``module``; a mismatch raises a ``CheckpointError`` listing the
    missing, unexpected and wrong-shape keys. ``assign=True`` adopts the tensors without copying (for
    modules built on the meta device). A diffusers-layout dict is converted for ``AutoencoderKL``."""
    if isinstance(module, AutoencoderKL) and is_diffusers_layout(state_dict):
        try:
            state_dict = convert_diffusers_to_ldm(state_dict)
        except KeyError as exc:
            raise CheckpointError(f"{source or 'state dict'}: {exc.args[0]}", source=source) from exc
    problems = _mismatch(module.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f"{source or 'state dict'} does not fit {type(module).__name__}: {problems}", source=source
        )
    try:
        nn.Module.load_state_dict(module, dict(state_dict), strict=True, assign=assign)
    except Exception as exc:  # e.g. a dtype that cannot be copied
        raise CheckpointError(
            f"cannot load {source or 'state dict'}: {_describe(exc)}", source=source
        ) from exc
    return module


def _mismatch(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> str:
    """'' when keys and shapes agree, else a readable summary."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [
        f"{k} (file {tuple(got[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f", … (+{len(items) - SHOW_KEYS} more)" if len(items) > SHOW_KEYS else ""
            parts.append(f"{len(items)} {label} [{', '.join(items[:SHOW_KEYS])}{more}]")
    if not parts:
        return ""
    return f"{'; '.join(parts)} ({len(expected)} keys expected, {len(got)} in file)"


# --- configs and modules -------------------------------------------------------------------------------


def load_network(
    url: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The COP-GEN-Beta network (``copgen.model.Triffuser``) with the weights at ``url``.

    Config: ``config``, else ``<name>.json`` or ``config.json`` beside the weights (a JSON with a
    ``"config"`` entry, like the reference sidecars, or the bare constructor arguments), else the
    safetensors header's ``config``, else the release config when the keys and shapes are the release's.
    Floating weights are cast to ``dtype`` (default float32). Returned in eval mode.
    """
    from copgen import model as model_module  # lazy: the network module is heavy and optional here

    def build(cfg: Mapping[str, Any]) -> nn.Module:
        cls = model_module.Triffuser
        return cls.from_config(dict(cfg)) if hasattr(cls, "from_config") else cls(**cfg)

    release = getattr(model_module, "RELEASE_CONFIG", None)
    return _load_module(
        str(url), config, build, release, _looks_like_network, sha256, storage_options, device, dtype
    )


def load_autoencoder(
    url: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> AutoencoderKL:
    """The KL autoencoder with the weights at ``url`` (LDM or diffusers layout); config as for
    ``load_network`` (flat ``AutoencoderKL`` keywords or the LDM form ``{ddconfig, embed_dim,
    scale_factor}``), the release SD KL-f8 config when the keys and shapes match it."""
    release = {**RELEASE_DDCONFIG, "embed_dim": RELEASE_EMBED_DIM, "scale_factor": RELEASE_SCALE_FACTOR}
    return _load_module(  # type: ignore[return-value]
        str(url),
        config,
        AutoencoderKL.from_config,
        release,
        _looks_like_autoencoder,
        sha256,
        storage_options,
        device,
        dtype,
    )


def _looks_like_network(cfg: Mapping[str, Any]) -> bool:
    return "depth" in cfg and "embed_dim" in cfg


def _looks_like_autoencoder(cfg: Mapping[str, Any]) -> bool:
    return "ddconfig" in cfg or "ch_mult" in cfg


def _load_module(
    url: str,
    config: Mapping[str, Any] | None,
    build: Callable[[Mapping[str, Any]], nn.Module],
    release: Mapping[str, Any] | None,
    accepts: Callable[[Mapping[str, Any]], bool],
    sha256: str | None,
    storage_options: Mapping[str, Any] | None,
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> nn.Module:
    shown = redact_url(url)
    loaded = _read(url, sha256, storage_options)
    state_dict = loaded.state_dict
    if config is not None:
        cfg, cfg_source = dict(config), "explicit"
    else:
        cfg, cfg_source = _find_config(url, storage_options, loaded, accepts) or (None, "")
    if cfg is None:
        cfg, cfg_source = _release_if_matching(state_dict, build, release, shown), "release"

    def construct(on: str) -> nn.Module:
        try:
            with torch.device(on):
                return build(cfg)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"invalid config for {shown} (from {cfg_source}): {_describe(exc)}", source=shown
            ) from exc

    module = construct("meta")
    load_into(module, state_dict, source=f"{shown} (config from {cfg_source})", assign=True)
    if any(t.is_meta for t in chain(module.parameters(), module.buffers())):
        # Non-persistent buffers are not in the state dict: build for real and copy instead.
        module = construct("cpu")
        load_into(module, state_dict, source=f"{shown} (config from {cfg_source})")
    # Drop our references first: a dtype/device change then frees each source tensor as it goes.
    del state_dict
    loaded.state_dict = {}
    module = module.to(device=device, dtype=dtype or torch.float32).eval()
    normalized = getattr(module, "config", None)  # e.g. AutoencoderKL's flat keywords
    module.checkpoint_info = CheckpointInfo(
        url=shown,
        config=dict(normalized) if isinstance(normalized, dict) else cfg,
        config_source=cfg_source,
        sha256=loaded.sha256,
        metadata=loaded.metadata,
    )
    return module


def _find_config(
    url: str,
    storage_options: Mapping[str, Any] | None,
    loaded: _Loaded,
    accepts: Callable[[Mapping[str, Any]], bool],
) -> tuple[dict[str, Any], str] | None:
    fs, path = _filesystem(url, storage_options)
    weights = PurePosixPath(path)
    candidates = (
        (weights.with_name(f"{weights.stem}.json"), True),
        (weights.with_name("config.json"), False),
    )
    for candidate, specific in candidates:
        if str(candidate) == str(weights):
            continue
        cfg = _read_json_config(fs, str(candidate), _sibling_url(url, weights, candidate))
        # A shared config.json may describe the other model of the folder: use it only if it fits.
        if cfg is not None and (specific or accepts(cfg)):
            return cfg, _sibling_url(url, weights, candidate)
    header = _header_config(loaded.metadata)
    if header is not None:
        return header, "safetensors header"
    return None


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
    inner = doc.get("config")
    return dict(inner) if isinstance(inner, dict) else doc


def _header_config(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The config that a safetensors header carries: ``config`` (JSON) or the LDM autoencoder form."""
    try:
        if "config" in metadata:
            cfg = json.loads(metadata["config"])
            return cfg if isinstance(cfg, dict) else None
        if "ddconfig" in metadata and "embed_dim" in metadata:
            cfg = {"ddconfig": json.loads(metadata["ddconfig"]), "embed_dim": int(metadata["embed_dim"])}
            if "scale_factor" in metadata:
                cfg["scale_factor"] = float(metadata["scale_factor"])
            return cfg
    except ValueError:
        return None
    return None


def _release_if_matching(
    state_dict: Mapping[str, Tensor],
    build: Callable[[Mapping[str, Any]], nn.Module],
    release: Mapping[str, Any] | None,
    shown: str,
) -> dict[str, Any]:
    hint = "no release config is known"
    if release is not None:
        with torch.device("meta"):
            reference = build(release)
        if isinstance(reference, AutoencoderKL) and is_diffusers_layout(state_dict):
            state_dict = convert_diffusers_to_ldm(state_dict)
        hint = _mismatch(reference.state_dict(), state_dict)
        if not hint:
            return dict(release)
        hint = f"vs the release: {hint}"
    raise CheckpointError(
        f"no config for {shown}: pass config=..., or put <name>.json or config.json beside it "
        f"(its keys are not the release's: {hint})",
        source=shown,
    )


def _sibling_url(url: str, weights: PurePosixPath, sibling: PurePosixPath) -> str:
    """The URL of a file beside the weights, for messages (keeps the protocol)."""
    shown = redact_url(url)
    if shown.endswith(weights.name):
        return shown[: len(shown) - len(weights.name)] + sibling.name
    return str(sibling)


# --- saving -------------------------------------------------------------------------------------------


def save_checkpoint(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``state_dict`` as safetensors at ``path`` (any fsspec URL) with ``config`` in the header and
    in ``<name>.json`` beside it (``{"config": ..., "metadata": ...}``); returns the file's sha256.

    Written to a temporary file first and moved/uploaded whole, so a crash never leaves a partial file
    under the final name.
    """
    from safetensors.torch import save_file

    url = str(path)
    shown = redact_url(url)
    if not url.endswith(".safetensors"):
        raise CheckpointError(f"checkpoints are saved as .safetensors, got {shown}", source=shown)
    header = {"config": json.dumps(dict(config)), "format": "pt"}
    header.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    sidecar = json.dumps({"config": dict(config), "metadata": dict(metadata or {})}, indent=1, default=str)
    fs, fs_path = _filesystem(url, storage_options)
    weights = PurePosixPath(fs_path)
    json_path = str(weights.with_name(weights.name[: -len(".safetensors")] + ".json"))
    try:
        with tempfile.TemporaryDirectory(prefix="copgen-save-") as tmp:
            local = Path(tmp) / weights.name
            save_file(tensors, str(local), metadata=header)
            digest = sha256_of(local)
            fs.makedirs(str(weights.parent), exist_ok=True)
            fs.put_file(str(local), fs_path)
            fs.pipe_file(json_path, sidecar.encode())
    except Exception as exc:
        raise CheckpointError(f"cannot save {shown}: {_describe(exc)}", source=shown) from exc
    return digest


# --- messages -----------------------------------------------------------------------------------------


_USERINFO = re.compile(r"[^\s/:@'\"]+:[^\s/@'\"]+@")


def _describe(exc: BaseException) -> str:
    """First line of an exception, with anything shaped like ``user:secret@`` masked: libraries quote
    the URL they were given."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _USERINFO.sub("***@", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
