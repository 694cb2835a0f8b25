"""Model configs: what builds a ``Triffuser`` or an ``AutoencoderKL``, as frozen, validated dataclasses.

A config is recorded in every checkpoint the project writes, as JSON under the safetensors metadata key
``config`` (:data:`CONFIG_KEY`) and in the ``<name>.json`` sidecar (``{"config": ..., "metadata": ...}``);
``to_dict``/``from_dict`` are that JSON form. A config also reads like that dict (``cfg["ch"]``,
``"norm_groups" in cfg``, ``dict(cfg)``), so code written against the old plain dicts keeps working.
Every refusal is a :class:`ConfigError` naming the config class and the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from copgen.errors import CopgenError

__all__ = ["CONFIG_KEY", "AutoencoderConfig", "ConfigError", "ModelConfig", "TriffuserConfig"]

#: The safetensors metadata key (and sidecar entry) that holds a checkpoint's config as JSON.
CONFIG_KEY = "config"


class ConfigError(CopgenError, ValueError):
    """A model config that cannot build its module; the message names the class and the field."""


class ModelConfig(Mapping[str, Any]):
    """Base of the config dataclasses: the ``to_dict`` form doubles as a read-only mapping view."""

    #: fields written by ``to_dict`` only when they differ from their default (keeps older JSON as it was)
    _OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (lists for sequences), in field order."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self._OPTIONAL and value == f.default:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]):
        """Build from the JSON form; unknown or missing fields are refused by name."""
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(config).__name__}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        names = [f.name for f in fields]
        unknown = [k for k in config if k not in names]
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field {unknown[0]!r} (fields: {', '.join(names)})")
        missing = [f.name for f in fields if f.name not in config and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.__name__}: missing field {missing[0]!r}"
                              + (f" (and {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""))
        return cls(**config)

    # the mapping view
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def _coerce(self) -> None:
        """Check and normalise every field against its annotation (int, float, bool, tuple[int, ...])."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            kind = str(f.type)
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = _integral(value)
                value = int(value) if ok else value
            elif kind == "float":
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                value = float(value) if ok else value
            else:  # tuple[int, ...]
                ok = isinstance(value, list | tuple) and all(_integral(v) for v in value)
                value = tuple(int(v) for v in value) if ok else value
            if not ok:
                wanted = "a list of ints" if kind.startswith("tuple") else kind
                raise self._error(f.name, f"{value!r} is not {wanted}")
            object.__setattr__(self, f.name, value)

    def _positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise self._error(name, f"must be positive, got {getattr(self, name)}")

    def _error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(f"{type(self).__name__} field {name!r}: {reason}")


def _integral(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())


#: The release factory's network name (``utils.get_nnet(name=...)``); release configs carry it.
RELEASE_NETWORK_NAME = "triffuser_multi_post_ln"
# Keys of the release's network config that this implementation accepts with one value only.
_RELEASE_ONLY = {"name": RELEASE_NETWORK_NAME, "mlp_time_embed": False, "pos_drop_rate": 0.0,
                 "drop_rate": 0.0, "attn_drop_rate": 0.0}


@dataclass(frozen=True)
class TriffuserConfig(ModelConfig):
    """The network's constructor arguments (release config names; defaults = the release network).

    ``use_checkpoint`` (activation checkpointing) and ``upcast_attention`` change neither the state dict
    nor the function computed, and are written only when set.
    """

    img_size: int = 32
    in_chans: int = 4
    patch_size: int = 2
    embed_dim: int = 1024
    depth: int = 20
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    num_modalities: int = 4
    use_checkpoint: bool = False
    upcast_attention: bool = False

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("use_checkpoint", "upcast_attention")

    def __post_init__(self) -> None:
        self._coerce()
        self._positive("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                       "num_modalities")
        if self.img_size % self.patch_size:
            raise self._error("img_size",
                              f"{self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.depth % 2:
            raise self._error("depth", f"must be even (in/out block pairs), got {self.depth}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TriffuserConfig:
        """Also accepts a release config: its ``name``, ``mlp_time_embed`` and dropout rates are checked
        (this implementation has one value for each: the release's) and dropped."""
        if isinstance(config, cls):
            return config
        cfg = dict(config) if isinstance(config, Mapping) else config
        if isinstance(cfg, dict):
            for key, only in _RELEASE_ONLY.items():
                if key in cfg and cfg.pop(key) != only:
                    raise ConfigError(f"{cls.__name__} field {key!r}: {config[key]!r} is not supported "
                                      f"(the release's {only!r} only: {_WHY[key]})")
        return super().from_dict(cfg)

    @classmethod
    def release(cls) -> TriffuserConfig:
        return cls()

    @staticmethod
    def describes(config: Mapping[str, Any]) -> bool:
        """Whether a JSON object found beside a checkpoint looks like a network config."""
        return "depth" in config and "embed_dim" in config


_WHY = {"name": "the network this class implements", "mlp_time_embed": "the release uses the raw sinusoid",
        **{k: "no dropout here" for k in ("pos_drop_rate", "drop_rate", "attn_drop_rate")}}

# The released SD KL-f8 autoencoder (LDM ddconfig names; embed_dim and scale_factor live beside it).
RELEASE_SCALE_FACTOR = 0.18215
RELEASE_EMBED_DIM = 4
RELEASE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


@dataclass(frozen=True)
class AutoencoderConfig(ModelConfig):
    """The autoencoder's keywords: the LDM ddconfig names plus ``embed_dim``, ``scale_factor`` and
    ``norm_groups`` (groups of every GroupNorm; written only off the release's 32)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    resolution: int
    in_channels: int = 3
    out_ch: int = 3
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    double_z: bool = True
    scale_factor: float = RELEASE_SCALE_FACTOR
    norm_groups: int = 32

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("norm_groups",)

    def __post_init__(self) -> None:
        self._coerce()
        self._positive("ch", "num_res_blocks", "z_channels", "embed_dim", "resolution", "in_channels",
                       "out_ch", "norm_groups")
        if not self.ch_mult:
            raise self._error("ch_mult", "must name at least one level")
        if not self.double_z:
            raise self._error("double_z", "AutoencoderKL needs double_z=True: the encoder must output mean "
                                          "and logvar")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> AutoencoderConfig:
        """The flat form (this class's fields) or the LDM form ``{"ddconfig": {...}, "embed_dim": 4,
        "scale_factor": 0.18215}`` (what the reference sidecars and the release's config use)."""
        if isinstance(config, Mapping) and not isinstance(config, cls) and "ddconfig" in config:
            flat = dict(config["ddconfig"])
            if "embed_dim" not in config:
                raise ConfigError(f"{cls.__name__}: the LDM form needs 'embed_dim' beside 'ddconfig'")
            flat["embed_dim"] = config["embed_dim"]
            if "scale_factor" in config:
                flat["scale_factor"] = config["scale_factor"]
            config = flat
        return super().from_dict(config)

    @classmethod
    def release(cls) -> AutoencoderConfig:
        return cls.from_dict({**RELEASE_DDCONFIG, "embed_dim": RELEASE_EMBED_DIM,
                              "scale_factor": RELEASE_SCALE_FACTOR})

    @staticmethod
    def describes(config: Mapping[str, Any]) -> bool:
        """Whether a JSON object found beside a checkpoint looks like an autoencoder config."""
        return "ddconfig" in config or "ch_mult" in config
