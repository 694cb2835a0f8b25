"""Weights fetched once into a shared store (here: a bucket on a real S3-compatible server), then read by
the loader every worker uses."""

from __future__ import annotations

import hashlib
from pathlib import Path

from copgen.flows.weights import RELEASE, fetch, main


def test_fetch_copies_once_then_skips(s3_server, tmp_path):
    from copgen import bundled

    net, vae = bundled.paths()
    sources = {"network.safetensors": str(net), "autoencoder.safetensors": str(vae)}
    dest = f"s3://{s3_server.new_bucket()}/models"
    first = fetch(dest, sources, s3_server.storage_options)
    fs = s3_server.filesystem()
    for name, src in sources.items():
        # file bytes: equal by construction of a copy
        data = Path(src).read_bytes()
        assert first[name]["copied"] and first[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert fs.cat_file(f"{dest}/{name}") == data
    assert not fs.glob(f"{dest}/*.partial")
    again = fetch(dest, sources, s3_server.storage_options)
    assert not any(r["copied"] for r in again.values())

    # the workers' loader reads the checkpoint from the bucket through fsspec
    from copgen import bundled as bundled_pkg
    from copgen.flows.models import load_network

    sha = bundled_pkg.checksums()["network.safetensors"]
    net = load_network(f"{dest}/network.safetensors", sha256=sha, storage_options=s3_server.storage_options)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_command_line(tmp_path, capsys):
    import json

    import pytest

    assert set(RELEASE) == {"nnet_ema_114000.pth", "autoencoder_kl.pth"}
    with pytest.raises(SystemExit):  # a name that would become a path outside --to
        main(["--to", str(tmp_path), "--source", f"../x={tmp_path}/a"])
    (tmp_path / "a.bin").write_bytes(b"weights")
    assert main(["--to", str(tmp_path / "models"), "--source", f"w.bin={tmp_path}/a.bin"]) == 0
    assert json.loads(capsys.readouterr().out)["w.bin"]["size"] == 7
    assert (tmp_path / "models" / "w.bin").read_bytes() == b"weights"
    assert main(["--to", str(tmp_path / "models"), "--source", f"v.bin={tmp_path}/missing.bin"]) == 2
