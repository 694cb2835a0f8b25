"""fsspec URL helpers shared by the readers and writers: one place that knows how URLs become filesystems.

Everything here is protocol-agnostic: local paths, ``file://``, ``s3://`` (s3fs, with ``storage_options``),
``hf://datasets/...`` (huggingface_hub's filesystem) and anything else fsspec can open.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from copgen.errors import CopgenError, redact_url  # noqa: F401 - re-exported: storage's name for it
from fsspec import AbstractFileSystem

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def url_to_fs(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
) -> tuple[AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url``; ``path`` is what that filesystem's methods take.

    With ``filesystem`` given, that instance is used (its protocol prefix is stripped from ``url``);
    otherwise one is made from the URL's protocol and ``storage_options``.
    """
    if filesystem is not None:
        return filesystem, filesystem._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path


def full_url(fs: AbstractFileSystem, path: str) -> str:
    """The URL (with protocol) of ``path`` on ``fs``, e.g. ``s3://bucket/key`` or ``file:///abs/path``."""
    return fs.unstrip_protocol(path)


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with ``/``, keeping the protocol and query intact."""
    cleaned = [p.strip("/") for p in parts if p and p.strip("/")]
    if not cleaned:
        return base
    if "://" in base:
        split = urlsplit(base)
        path = "/".join([split.path.rstrip("/"), *cleaned])
        return urlunsplit((split.scheme, split.netloc, path, split.query, split.fragment))
    return "/".join([base.rstrip("/"), *cleaned]) if base not in ("", "/") else "/" + "/".join(cleaned)


class StorageIdError(CopgenError, ValueError):
    """An identifier that would become part of a path is not safe (separators, ``..``, odd characters)."""


def check_id(value: object, what: str = "name") -> str:
    """Validate an identifier that becomes one path component: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""
    if not isinstance(value, str) or not _SAFE_COMPONENT.match(value) or ".." in value:
        raise StorageIdError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, and no '..' (it becomes part of a storage path)"
        )
    return value


safe_component = check_id  # the readers' name for it
