"""Fit a checkpoint's tensors to a module: find its config, check keys and shapes, build the module.

No bytes here: ``copgen.storage.checkpoint_files`` reads a file (any fsspec URL, safetensors or a
weights-only pickle, sha256-verified) into a :class:`Checkpoint`, and ``copgen.flows.models.load_network``
/ ``load_autoencoder`` join the two. This module decides:

- the config (:func:`resolve_config`, the one place it is found): given explicitly, else the
  ``<name>.json`` sidecar, else a ``config.json`` beside the weights that describes this kind of model,
  else the safetensors metadata key ``config`` (:data:`copgen.configs.CONFIG_KEY`; or the LDM autoencoder
  keys ``ddconfig``/``embed_dim``/``scale_factor``), else the release config when the keys and shapes are
  the release's (the official ``.pth`` files carry no config);
- strict fitting (:func:`load_into`): missing, unexpected and wrong-shape keys are listed, first few of
  each with counts; a diffusers-layout autoencoder is converted to the LDM layout first;
- building on the meta device and adopting the tensors without a copy (the release network, 1.1 GB,
  costs one copy, two while converting ``dtype``).

Every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from copgen.configs import CONFIG_KEY, AutoencoderConfig, ConfigError, ModelConfig, TriffuserConfig
from copgen.errors import CopgenError, describe_error
from torch import Tensor, nn

__all__ = [
    "AUTOENCODER",
    "NETWORK",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "ModelKind",
    "build_module",
    "load_into",
    "resolve_config",
]

SHOW_KEYS = 5  # how many keys of each kind an error message lists


class CheckpointError(CopgenError, RuntimeError):
    """A checkpoint could not be read, verified or loaded; ``source`` is the URL or path concerned."""

    def __init__(self, message: str, *, source: str = "") -> None:
        super().__init__(message)
        self.source = source


@dataclass
class CheckpointInfo:
    """Where a loaded module's weights came from (attached as ``module.checkpoint_info``)."""

    url: str
    config: dict[str, Any]  # the module's config in its JSON form (ModelConfig.to_dict)
    config_source: str  # "explicit", a JSON URL, "safetensors header" or "release"
    sha256: str | None = None  # known when verified or computed while downloading
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata


@dataclass
class Checkpoint:
    """One checkpoint file as storage read it: the tensors and what may describe them."""

    source: str  # the file's URL with credentials removed (for messages)
    state_dict: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    sha256: str | None = None
    # JSON objects found beside the weights, in order of preference: (URL, object, specific), where
    # specific = named after the weights (``<name>.json``) rather than a folder's shared ``config.json``
    sidecars: tuple[tuple[str, dict[str, Any], bool], ...] = ()


@dataclass(frozen=True)
class ModelKind:
    """A kind of module a checkpoint builds: its config class, its builder, its release config."""

    name: str
    config_class: type[ModelConfig]
    build: Callable[[Mapping[str, Any]], nn.Module]
    release: Mapping[str, Any]


# The modules are imported when first built: copgen.storage reads checkpoints through this module's
# records and errors, and storage never imports the torch models (DESIGN §2).
def _build_network(config: Mapping[str, Any]) -> nn.Module:
    from copgen.model import Triffuser

    return Triffuser.from_config(config)


def _build_autoencoder(config: Mapping[str, Any]) -> nn.Module:
    from copgen.autoencoder import AutoencoderKL

    return AutoencoderKL.from_config(config)


NETWORK = ModelKind("network", TriffuserConfig, _build_network, TriffuserConfig.release().to_dict())
AUTOENCODER = ModelKind("autoencoder", AutoencoderConfig, _build_autoencoder,
                        AutoencoderConfig.release().to_dict())


# --- the config ----------------------------------------------------------------------------------------


def resolve_config(kind: ModelKind, ckpt: Checkpoint, explicit: Mapping[str, Any] | None = None,
                   ) -> tuple[ModelConfig, str]:
    """The config that builds ``ckpt`` as ``kind``, and where it was found (see the module docstring)."""
    if explicit is not None:
        found, where = explicit, "explicit"
    else:
        found, where = _recorded_config(kind, ckpt)
        if found is None:
            found, where = _release_if_matching(ckpt.state_dict, kind.build, dict(kind.release),
                                                ckpt.source), "release"
    try:
        return kind.config_class.from_dict(found), where
    except ConfigError as exc:
        raise CheckpointError(f"invalid config for {ckpt.source} (from {where}): {describe_error(exc)}",
                              source=ckpt.source) from exc


def _recorded_config(kind: ModelKind, ckpt: Checkpoint) -> tuple[Mapping[str, Any] | None, str]:
    for url, doc, specific in ckpt.sidecars:
        inner = doc.get(CONFIG_KEY)
        cfg = inner if isinstance(inner, dict) else doc  # {"config": ..., "metadata": ...} or bare
        # A shared config.json may describe the other model of the folder: use it only if it fits.
        if specific or kind.config_class.describes(cfg):
            return cfg, url
    header = _header_config(ckpt.metadata, ckpt.source)
    return (header, "safetensors header") if header is not None else (None, "")


def _header_config(metadata: Mapping[str, str], shown: str) -> dict[str, Any] | None:
    """The config a safetensors header carries: ``config`` (JSON) or the LDM autoencoder form."""
    if CONFIG_KEY in metadata:
        cfg = _header_json(metadata, CONFIG_KEY, shown)
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{shown}: safetensors metadata key {CONFIG_KEY!r} is not a JSON object",
                                  source=shown)
        return cfg
    if "ddconfig" in metadata and "embed_dim" in metadata:
        return {k: _header_json(metadata, k, shown) for k in ("ddconfig", "embed_dim", "scale_factor")
                if k in metadata}
    return None


def _header_json(metadata: Mapping[str, str], key: str, shown: str) -> Any:
    try:
        return json.loads(metadata[key])
    except ValueError as exc:
        raise CheckpointError(f"{shown}: safetensors metadata key {key!r} is not valid JSON ({exc})",
                              source=shown) from exc


def _release_if_matching(
    state_dict: Mapping[str, Tensor],
    build: Callable[[Mapping[str, Any]], nn.Module],
    release: Mapping[str, Any] | None,
    shown: str,
) -> dict[str, Any]:
    """``release`` when ``state_dict`` has exactly the keys and shapes of the module it builds."""
    hint = "no release config is known"
    if release is not None:
        with torch.device("meta"):
            reference = build(release)
        hint = _mismatch(reference.state_dict(), _ldm_layout(reference, state_dict, shown))
        if not hint:
            return dict(release)
        hint = f"vs the release: {hint}"
    raise CheckpointError(
        f"no config for {shown}: pass config=..., put <name>.json or config.json beside it, or record it "
        f"under the safetensors metadata key {CONFIG_KEY!r} (its keys are not the release's: {hint})",
        source=shown,
    )


# --- fitting a module ---------------------------------------------------------------------------------


def build_module(kind: ModelKind, ckpt: Checkpoint, config: Mapping[str, Any] | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """``kind``'s module with ``ckpt``'s weights (config as :func:`resolve_config` finds it), floating
    weights cast to ``dtype`` (default float32), in eval mode, with ``checkpoint_info`` attached.
    Takes the tensors out of ``ckpt`` (so a dtype/device change frees each source tensor as it goes)."""
    cfg, where = resolve_config(kind, ckpt, config)
    shown = ckpt.source
    state_dict, ckpt.state_dict = ckpt.state_dict, {}

    def construct(on: str) -> nn.Module:
        try:
            with torch.device(on):
                return kind.build(cfg)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"invalid config for {shown} (from {where}): {describe_error(exc)}", source=shown
            ) from exc

    module = construct("meta")
    load_into(module, state_dict, source=f"{shown} (config from {where})", assign=True)
    if any(t.is_meta for t in chain(module.parameters(), module.buffers())):
        # Non-persistent buffers are not in the state dict: build for real and copy instead.
        module = construct("cpu")
        load_into(module, state_dict, source=f"{shown} (config from {where})")
    del state_dict  # the module holds the only references now
    module = module.to(device=device, dtype=dtype or torch.float32).eval()
    module.checkpoint_info = CheckpointInfo(url=shown, config=module.config.to_dict(), config_source=where,
                                            sha256=ckpt.sha256, metadata=ckpt.metadata)
    return module


def load_into(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "", assign: bool = False):
    """Strictly load ``state_dict`` into ``module``; a mismatch raises a ``CheckpointError`` listing the
    missing, unexpected and wrong-shape keys. ``assign=True`` adopts the tensors without copying (for
    modules built on the meta device). A diffusers-layout dict is converted for ``AutoencoderKL``."""
    state_dict = _ldm_layout(module, state_dict, source)
    problems = _mismatch(module.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f"{source or 'state dict'} does not fit {type(module).__name__}: {problems}", source=source
        )
    try:
        nn.Module.load_state_dict(module, dict(state_dict), strict=True, assign=assign)
    except Exception as exc:  # e.g. a dtype that cannot be copied
        raise CheckpointError(
            f"cannot load {source or 'state dict'}: {describe_error(exc)}", source=source
        ) from exc
    return module


def _ldm_layout(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> Mapping[str, Tensor]:
    """A diffusers-layout state dict converted to the LDM layout when ``module`` is the autoencoder."""
    from copgen.autoencoder import AutoencoderKL, convert_diffusers_to_ldm, is_diffusers_layout

    if not (isinstance(module, AutoencoderKL) and is_diffusers_layout(state_dict)):
        return state_dict
    try:
        return convert_diffusers_to_ldm(state_dict)
    except KeyError as exc:
        raise CheckpointError(f"{source or 'state dict'}: {exc.args[0]}", source=source) from exc


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
