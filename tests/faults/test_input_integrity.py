"""Finding 8 and 10: corruption that decodes is an error where the formats allow telling it (Parquet page
CRCs, PNG chunk CRCs, JPEG structure); untrusted checkpoints are refused without suggesting the unsafe way
round, and a checkpoint of the wrong shape names its keys."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from copgen.checkpoints import CheckpointError, load_into
from copgen.modalities import Modality
from copgen.storage.checkpoint_files import open_state_dict
from copgen.storage.majortom.reader import MajorTomReader
from copgen.storage.majortom.thumbnails import ThumbnailError, decode_thumbnail
from PIL import Image
from safetensors.torch import save_file


def _jpeg(restart_rows: int = 1) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, restart_marker_rows=restart_rows)
    return buf.getvalue()


def _pil_decodes(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
    return True


def test_jpeg_corruption_that_pillow_decodes_is_an_error():
    good = _jpeg()
    assert decode_thumbnail(good).shape == (64, 64, 3)
    rst = good.index(b"\xff\xd0")
    dqt = good.index(b"\xff\xdb")
    cases = {"restart marker": good[:rst + 1] + b"\xd5" + good[rst + 2:],
             "extraneous bytes": good[:dqt] + b"\x12\x34" + good[dqt:]}
    for what, data in cases.items():
        assert _pil_decodes(data)  # Pillow alone would store these as real
        with pytest.raises(ThumbnailError, match=what.split()[0]):
            decode_thumbnail(data, context={"cell": "1U_1R"})
    with pytest.raises(ThumbnailError, match="truncated"):
        decode_thumbnail(good[:-40])


def test_png_chunk_crcs_are_checked():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    crc_at = data.index(b"IEND") - 4  # the last byte of the IDAT chunk's CRC
    data[crc_at - 1] ^= 0xFF
    with pytest.raises(ThumbnailError, match="checksum|broken"):
        decode_thumbnail(bytes(data))


def test_parquet_page_checksums_are_verified(tmp_path):
    from copgen.flows.demo import write_demo_world

    root = str(tmp_path / "w")
    meta = write_demo_world(root, seed=1, rows=2, cols=2, origin=(46.0, 8.0), thumbnail_size=96, missing={},
                            cloud_prob=0.0)
    reader = MajorTomReader(root, thumbnail_sizes=meta["thumbnail_sizes"], on_error="skip")
    pairs = reader.pair().pairs
    ref = reader.refs(pairs.iloc[:1], Modality.S2L2A)[0]
    thumb = reader.read_samples([ref]).samples[0].thumbnail
    path = Path(ref.file)
    data = bytearray(path.read_bytes())
    stored = pq.ParquetFile(path).read_row_group(ref.row_group, columns=["thumbnail"]).column(0)[0].as_py()
    at = data.index(stored) + len(stored) // 2  # inside the (uncompressed) image bytes of that page
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = MajorTomReader(root, thumbnail_sizes=meta["thumbnail_sizes"], on_error="skip")
    got = fresh.read_samples([ref])
    assert not got.samples and len(got.bad) == 1
    assert "checksum" in got.bad[0].reason.lower() or "crc" in got.bad[0].reason.lower()
    assert thumb is not None


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_refusal_never_suggests_weights_only_false(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": _Exploit(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError) as err:
        open_state_dict(tmp_path / "evil.pth")
    text = str(err.value)
    assert "refused" in text and "mkdir" in text  # says what it refused
    assert "False" not in text and "likely succeed" not in text
    assert err.value.__cause__ is None and not marker.exists()


def test_a_wrong_shape_checkpoint_names_its_keys(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in net.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"4 wrong shape \[0\.weight \(file \(5, 3\), model \(4, 3\)\)"):
        load_into(net, open_state_dict(tmp_path / "w.safetensors"), source="w.safetensors")
