"""Checkpoint loading: formats, fsspec sources (local, real S3 server, hf://), verification, clear errors
(the bytes in copgen.storage.checkpoint_files, the fitting in copgen.checkpoints, joined in flows.models)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import fsspec
import pytest
import torch
from copgen import checkpoints as ck
from copgen.autoencoder import RELEASE_DDCONFIG, AutoencoderKL
from copgen.checkpoints import CheckpointError, load_into
from copgen.errors import redact_url
from copgen.flows.models import load_autoencoder, load_network
from copgen.storage.checkpoint_files import open_state_dict, save_checkpoint, sha256_of
from safetensors.torch import load_file, save_file
from tolerances import AUTOENCODER_ATOL, AUTOENCODER_RTOL


@pytest.fixture(scope="module")
def ae_sidecar(reference_dir):
    return json.loads((reference_dir / "autoencoder_tiny.json").read_text())


@pytest.fixture(scope="module")
def ae_state(reference_dir):
    return load_file(reference_dir / "autoencoder_tiny.safetensors")


@pytest.fixture(scope="module")
def ae_io(reference_dir):
    return load_file(reference_dir / "autoencoder_tiny_io.safetensors")


def _flat_config(sidecar) -> dict:
    return {**sidecar["ddconfig"], "embed_dim": sidecar["embed_dim"], "scale_factor": sidecar["scale_factor"]}


def _assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key].to(value.dtype), value), key  # exact: file bytes, copies, IEEE casts


def _file_sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- local formats ------------------------------------------------------------------------------------


def test_save_checkpoint_round_trip_with_sidecar_config(tmp_path, ae_sidecar, ae_state, ae_io):
    path = tmp_path / "vae.safetensors"
    digest = save_checkpoint(ae_state, path, _flat_config(ae_sidecar), {"step": 12, "note": "tiny"})
    assert digest == _file_sha(path) == sha256_of(path)
    assert json.loads((tmp_path / "vae.json").read_text())["metadata"] == {"step": 12, "note": "tiny"}

    vae = load_autoencoder(path, sha256=digest)
    info = vae.checkpoint_info
    assert info.config_source.endswith("vae.json") and info.sha256 == digest
    assert info.metadata["step"] == "12" and json.loads(info.metadata["config"]) == _flat_config(ae_sidecar)
    _assert_same_state(vae.state_dict(), ae_state)
    with torch.no_grad():
        decoded = vae.decode(ae_io["z_fixed"])
        torch.testing.assert_close(decoded, ae_io["decoded"], atol=AUTOENCODER_ATOL, rtol=AUTOENCODER_RTOL)

    # Without the JSON the safetensors header still carries the config.
    (tmp_path / "vae.json").unlink()
    vae = load_autoencoder(f"file://{path}")
    assert vae.checkpoint_info.config_source == "safetensors header"
    _assert_same_state(vae.state_dict(), ae_state)


def test_the_same_weights_and_metadata_give_the_same_file_bytes(tmp_path, ae_sidecar, ae_state):
    # safetensors writes its metadata map in hash order (a new order per call): the saved bytes, and so the
    # sha256 recorded in provenance, would change between two saves of the same checkpoint.
    from safetensors import safe_open

    meta = {"step": 12, "note": "tiny", "run": "r1", "epoch": 3, "stage": "vae"}
    digests = {save_checkpoint(ae_state, tmp_path / f"v{i}.safetensors", _flat_config(ae_sidecar), meta)
               for i in range(4)}
    assert len(digests) == 1
    with safe_open(str(tmp_path / "v0.safetensors"), "pt") as f:
        stored = f.metadata()
        assert stored["step"] == "12" and json.loads(stored["config"]) == _flat_config(ae_sidecar)
        _assert_same_state({k: f.get_tensor(k) for k in f.keys()}, ae_state)  # noqa: SIM118 (safe_open has no __iter__)


def test_reference_files_load_with_their_sidecars(reference_dir, ae_state):
    vae = load_autoencoder(reference_dir / "autoencoder_tiny.safetensors")  # sidecar in the LDM form
    assert vae.checkpoint_info.config_source.endswith("autoencoder_tiny.json")
    _assert_same_state(vae.state_dict(), ae_state)

    net_state = load_file(reference_dir / "triffuser_tiny.safetensors")
    net = load_network(reference_dir / "triffuser_tiny.safetensors", dtype=torch.bfloat16)
    assert type(net).__name__ == "Triffuser"
    assert net.checkpoint_info.config_source.endswith("triffuser_tiny.json")
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    _assert_same_state(
        {k: v.float() for k, v in net.state_dict().items()},
        {k: v.to(torch.bfloat16).float() for k, v in net_state.items()},
    )


def test_pth_round_trip_and_wrappers(tmp_path, ae_sidecar, ae_state):
    def save(obj, name, zip_format=True):
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization=zip_format)
        return tmp_path / name

    _assert_same_state(open_state_dict(save(ae_state, "plain.pth")), ae_state)
    _assert_same_state(open_state_dict(save(ae_state, "legacy.pth", zip_format=False)), ae_state)
    _assert_same_state(open_state_dict(save({"state_dict": ae_state, "epoch": 3}, "wrapped.ckpt")), ae_state)
    _assert_same_state(open_state_dict(save({"model": ae_state, "opt": {"lr": 1.0}}, "model.pt")), ae_state)
    ddp = {f"module.{k}": v for k, v in ae_state.items()}
    _assert_same_state(open_state_dict(save(ddp, "ddp.pth")), ae_state)
    # A misnamed file is recognised by its bytes.
    _assert_same_state(open_state_dict(save(ae_state, "actually_torch.safetensors")), ae_state)

    vae = load_autoencoder(tmp_path / "plain.pth", config=_flat_config(ae_sidecar), dtype=torch.float64)
    assert vae.checkpoint_info.config_source == "explicit"
    assert all(p.dtype == torch.float64 for p in vae.parameters())
    _assert_same_state({k: v.float() for k, v in vae.state_dict().items()}, ae_state)

    with pytest.raises(CheckpointError, match=r"does not hold a state dict.*\['epoch'"):
        open_state_dict(save({"epoch": 3, "weights": [1, 2]}, "not_a_state.pth"))


def test_diffusers_layout_file_loads(tmp_path, ae_sidecar, ae_state):
    # The layout conversion itself is tested in test_autoencoder; here: it is applied on load.
    from tests.core.test_autoencoder import _to_diffusers

    diff = _to_diffusers(ae_state, len(ae_sidecar["ddconfig"]["ch_mult"]))
    save_file(diff, tmp_path / "diffusers_vae.safetensors")
    vae = load_autoencoder(tmp_path / "diffusers_vae.safetensors", config=ae_sidecar)
    _assert_same_state(vae.state_dict(), ae_state)


# --- remote sources -------------------------------------------------------------------------------------


def test_s3_round_trip(s3_server, tmp_path, ae_sidecar, ae_state):
    bucket = s3_server.new_bucket()
    opts = s3_server.storage_options
    url = f"s3://{bucket}/models/vae.safetensors"
    digest = save_checkpoint(ae_state, url, _flat_config(ae_sidecar), {"run": "s3"}, storage_options=opts)
    fs = s3_server.filesystem()
    assert fs.exists(f"{bucket}/models/vae.json")
    assert sha256_of(url, storage_options=opts) == digest

    vae = load_autoencoder(url, sha256=digest.upper(), storage_options=opts)
    assert vae.checkpoint_info.config_source == f"s3://{bucket}/models/vae.json"
    assert vae.checkpoint_info.sha256 == digest
    _assert_same_state(vae.state_dict(), ae_state)

    torch.save({"state_dict": ae_state}, tmp_path / "vae.pth")
    fs.put_file(str(tmp_path / "vae.pth"), f"{bucket}/models/vae_release_layout.pth")
    pth_url = f"s3://{bucket}/models/vae_release_layout.pth"
    _assert_same_state(
        open_state_dict(pth_url, sha256=_file_sha(tmp_path / "vae.pth"), storage_options=opts), ae_state
    )

    with pytest.raises(CheckpointError, match="sha256 mismatch") as err:
        open_state_dict(pth_url, sha256="0" * 64, storage_options=opts)
    assert pth_url in str(err.value)
    with pytest.raises(CheckpointError, match="cannot read") as err:
        open_state_dict(f"s3://{bucket}/models/absent.pth", storage_options=opts)
    assert "absent.pth" in str(err.value)
    # No JSON beside it, not the release keys: a clear request for a config, with the release comparison.
    with pytest.raises(CheckpointError, match="no config for .*vae_release_layout.pth.*missing"):
        load_autoencoder(pth_url, storage_options=opts)


@pytest.mark.timeout(60)
def test_hf_urls_go_to_the_hub_filesystem_and_fail_clearly_offline(monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfFileSystem

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    url = "hf://mespinosami/COP-GEN-Beta/nnet_ema_114000.pth"
    fs, path = fsspec.core.url_to_fs(url)
    assert isinstance(fs, HfFileSystem) and path == "mespinosami/COP-GEN-Beta/nnet_ema_114000.pth"
    with pytest.raises(CheckpointError, match="cannot read hf://mespinosami/COP-GEN-Beta/nnet_ema") as err:
        load_network(url)
    assert "offline" in str(err.value).lower()
    assert err.value.source == url


# --- verification and bad files -----------------------------------------------------------------------


def test_sha256_ok_and_mismatch(tmp_path, ae_state):
    path = tmp_path / "w.safetensors"
    save_file(ae_state, path)
    good = _file_sha(path)
    _assert_same_state(open_state_dict(path, sha256=good), ae_state)
    bad = good[:-1] + ("0" if good[-1] != "0" else "1")
    with pytest.raises(CheckpointError, match=f"sha256 mismatch for {path}: expected {bad}, got {good}"):
        open_state_dict(path, sha256=bad)
    with pytest.raises(CheckpointError, match="64 hex digits"):
        open_state_dict(path, sha256="abc")


def test_corrupted_and_truncated_files_are_named(tmp_path, ae_state):
    good = tmp_path / "good.safetensors"
    save_file(ae_state, good)
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "header_only.safetensors": data[:100],
        "garbage.safetensors": os.urandom(4096),
        "empty.pth": b"",
    }
    torch.save(ae_state, tmp_path / "good.pth")
    pth = (tmp_path / "good.pth").read_bytes()
    cases["truncated.pth"] = pth[: len(pth) // 2]
    legacy = tmp_path / "legacy.pth"
    torch.save(ae_state, legacy, _use_new_zipfile_serialization=False)
    cases["truncated_legacy.pth"] = legacy.read_bytes()[: legacy.stat().st_size // 2]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            open_state_dict(tmp_path / name)
        message = str(err.value)
        assert name in message and err.value.source.endswith(name), message
        assert "Traceback" not in message and len(message) < 600, message
    with pytest.raises(CheckpointError, match="cannot read .*missing.safetensors"):
        open_state_dict(tmp_path / "missing.safetensors")


class _Exploit:
    """Unpickling this runs os.mkdir(marker): a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickles_with_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "payload": _Exploit(str(marker))}, tmp_path / "evil.pth")
    with open(tmp_path / "evil_plain.pth", "wb") as f:
        pickle.dump(_Exploit(str(marker)), f, protocol=2)
    for name in ("evil.pth", "evil_plain.pth"):
        with pytest.raises(CheckpointError, match=f"refused to load .*{name}.*weights_only=True"):
            open_state_dict(tmp_path / name)
    assert not marker.exists()


def test_mismatched_state_dict_lists_keys_and_counts(tmp_path, ae_sidecar, ae_state):
    broken = dict(ae_state)
    dropped = sorted(k for k in broken if k.startswith("decoder.up."))[:8]
    for key in dropped:
        del broken[key]
    broken["decoder.extra.weight"] = torch.zeros(3)
    broken["encoder.conv_in.weight"] = torch.zeros(5, 3, 3, 3)
    path = tmp_path / "broken.safetensors"
    save_file(broken, path)
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(path, config=_flat_config(ae_sidecar))
    message = str(err.value)
    assert str(path) in message
    in_model_order = [k for k in AutoencoderKL.from_config(ae_sidecar).state_dict() if k in dropped]
    assert "8 missing" in message and "(+3 more)" in message
    assert all(k in message for k in in_model_order[:5])
    assert not any(k in message for k in in_model_order[5:])  # only the first few are listed
    assert "1 unexpected [decoder.extra.weight]" in message
    want = tuple(ae_state["encoder.conv_in.weight"].shape)
    assert f"encoder.conv_in.weight (file (5, 3, 3, 3), model {want})" in message

    module = AutoencoderKL.from_config(ae_sidecar)
    with pytest.raises(CheckpointError, match=r"^my.pth does not fit AutoencoderKL: 8 missing"):
        load_into(module, broken, source="my.pth")
    # Same config, correct dict: loads strictly and copies values.
    load_into(module, ae_state, source="ok")
    _assert_same_state(module.state_dict(), ae_state)


def test_invalid_config_is_reported(tmp_path, ae_sidecar, ae_state):
    path = tmp_path / "vae.safetensors"
    save_file(ae_state, path)
    (tmp_path / "vae.json").write_text(json.dumps({"config": {**_flat_config(ae_sidecar), "bogus": 1}}))
    with pytest.raises(CheckpointError, match=r"invalid config for .*vae.safetensors \(from .*vae.json\)"):
        load_autoencoder(path)
    (tmp_path / "vae.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vae.json is not valid JSON"):
        load_autoencoder(path)


def test_shared_config_json_of_the_other_model_is_ignored(tmp_path, reference_dir, ae_state):
    shutil.copy(reference_dir / "autoencoder_tiny.safetensors", tmp_path / "autoencoder.safetensors")
    network_cfg = json.loads((reference_dir / "triffuser_tiny.json").read_text())["config"]
    (tmp_path / "config.json").write_text(json.dumps(network_cfg))
    vae = load_autoencoder(tmp_path / "autoencoder.safetensors")
    assert vae.checkpoint_info.config_source == "safetensors header"
    _assert_same_state(vae.state_dict(), ae_state)


def test_release_configs_are_recognised_by_their_keys():
    from copgen.model import RELEASE_CONFIG, Triffuser

    with torch.device("meta"):
        vae_keys = AutoencoderKL.release().state_dict()
        net_keys = Triffuser(**RELEASE_CONFIG).state_dict()
    release_vae = {**RELEASE_DDCONFIG, "embed_dim": 4, "scale_factor": 0.18215}
    assert ck._release_if_matching(vae_keys, AutoencoderKL.from_config, release_vae, "x") == release_vae
    assert ck._release_if_matching(net_keys, Triffuser.from_config, RELEASE_CONFIG, "x") == RELEASE_CONFIG
    del vae_keys["quant_conv.bias"]
    with pytest.raises(CheckpointError, match=r"no config for x: .*1 missing \[quant_conv.bias\]"):
        ck._release_if_matching(vae_keys, AutoencoderKL.from_config, release_vae, "x")


def test_credentials_never_reach_messages(tmp_path):
    url = "s3://AKIDEXAMPLE:s3cr3t@bucket/missing.pth"
    assert redact_url(url) == "s3://bucket/missing.pth"
    with pytest.raises(CheckpointError) as err:
        open_state_dict(f"file://user:s3cr3t@{tmp_path}/missing.pth")
    assert "s3cr3t" not in str(err.value) and "s3cr3t" not in err.value.source
