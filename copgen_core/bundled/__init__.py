"""The small COP-GEN-Beta-architecture model shipped with the package (see MODEL_CARD.md here).

It was trained with ``copgen.flows.train`` (the code behind ``copgen train``; recipe in
``benchmarks/train_bundled.py``) on a procedural Copernicus world (not the demo's), at 64 px, so a fresh
install can run the whole pipeline offline. It is not the released model: for real data pass the
released weights (``--weights hf://mespinosami/COP-GEN-Beta/nnet_ema_114000.pth --vae ...``).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
NETWORK = HERE / "network.safetensors"
AUTOENCODER = HERE / "autoencoder.safetensors"
CHECKSUMS = HERE / "SHA256SUMS.json"


def available() -> bool:
    return NETWORK.is_file() and AUTOENCODER.is_file()


def paths() -> tuple[str, str]:
    """(network, autoencoder) checkpoint paths; a clear error when the files are missing."""
    if not available():
        raise FileNotFoundError(
            f"the bundled model is missing from {HERE} (a source checkout without the weights?): "
            "pass --weights and --vae"
        )
    return str(NETWORK), str(AUTOENCODER)


def checksums() -> dict[str, str]:
    """The recorded sha256 of each bundled file (verified when the model is loaded)."""
    return json.loads(CHECKSUMS.read_text()) if CHECKSUMS.is_file() else {}
