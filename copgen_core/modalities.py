"""The four Copernicus modalities in the model's canonical order (the index is the model's input slot)."""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Modality(enum.IntEnum):
    """Model index order is fixed by the release: DEM=0, S1RTC=1, S2L1C=2, S2L2A=3."""

    DEM = 0
    S1RTC = 1
    S2L1C = 2
    S2L2A = 3

    @property
    def dataset(self) -> str:
        """Major TOM Core dataset name, e.g. ``Core-S2L2A``."""
        return f"Core-{self.name}"

    @property
    def reference_name(self) -> str:
        """The name the reference implementation uses (``dem``, ``s1_rtc``, ``s2_l1c``, ``s2_l2a``)."""
        return _REFERENCE_NAMES[self]

    @classmethod
    def parse(cls, value: str | int | Modality) -> Modality:
        """Accept a user-typed name (case-insensitive; reference names and dataset names too) or an index."""
        if isinstance(value, Modality):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                raise ValueError(
                    f"unknown modality index {value!r}; valid indices are 0..{len(cls) - 1} ({names()})"
                ) from None
        if isinstance(value, str):
            key = value.strip().upper().replace("-", "").replace("_", "")
            if key.startswith("CORE"):
                key = key[4:]
            for m in cls:
                if key == m.name:
                    return m
        raise ValueError(f"unknown modality {value!r}; valid names are {names()} (case-insensitive)")


_REFERENCE_NAMES = {
    Modality.DEM: "dem",
    Modality.S1RTC: "s1_rtc",
    Modality.S2L1C: "s2_l1c",
    Modality.S2L2A: "s2_l2a",
}

ALL: tuple[Modality, ...] = tuple(Modality)


def names() -> str:
    return ", ".join(m.name for m in Modality)


def parse_list(values: str | Iterable[str | int | Modality]) -> tuple[Modality, ...]:
    """Parse ``"S2L2A,S1RTC"`` or an iterable; returns unique modalities in canonical order."""
    if isinstance(values, str):
        values = [v for v in values.replace(" ", ",").split(",") if v]
    parsed = {Modality.parse(v) for v in values}
    return tuple(sorted(parsed))
