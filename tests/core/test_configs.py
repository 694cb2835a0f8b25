"""Model configs: frozen dataclasses, their JSON form, validation by field, and the record in checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from copgen.autoencoder import AutoencoderKL
from copgen.checkpoints import CheckpointError
from copgen.configs import CONFIG_KEY, AutoencoderConfig, ConfigError, TriffuserConfig
from copgen.flows.models import load_autoencoder, load_network
from copgen.model import RELEASE_CONFIG, Triffuser
from copgen.storage.checkpoint_files import save_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

SMALL_NET = {"img_size": 4, "in_chans": 4, "patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2}
SMALL_AE = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4, "resolution": 8,
            "norm_groups": 4}


def test_configs_round_trip_through_their_json_form(reference_dir):
    sidecar = json.loads((reference_dir / "triffuser_tiny.json").read_text())["config"]
    net = TriffuserConfig.from_dict(sidecar)  # the release factory's own dict: name and dropout keys
    assert TriffuserConfig.from_dict(json.loads(net.to_json())) == net
    assert "use_checkpoint" not in net.to_dict()  # runtime switches are written only when set
    assert TriffuserConfig.from_dict(RELEASE_CONFIG) == TriffuserConfig.release()

    ae_sidecar = json.loads((reference_dir / "autoencoder_tiny.json").read_text())
    ae = AutoencoderConfig.from_dict(ae_sidecar)  # the LDM form
    assert ae.ch_mult == tuple(ae_sidecar["ddconfig"]["ch_mult"])
    assert ae.scale_factor == ae_sidecar["scale_factor"]
    assert AutoencoderConfig.from_dict(ae.to_dict()) == ae
    # the mapping view is the JSON form: what code written against plain dicts reads
    assert dict(ae) == ae.to_dict() and ae["ch_mult"] == list(ae.ch_mult) and "norm_groups" not in ae


def test_modules_are_built_from_their_configs():
    net = Triffuser.from_config(TriffuserConfig(**SMALL_NET))
    assert net.config == TriffuserConfig(**SMALL_NET) == Triffuser(**SMALL_NET).config
    ae = AutoencoderKL.from_config(AutoencoderConfig.from_dict(SMALL_AE))
    assert isinstance(ae.config, AutoencoderConfig) and ae.config.norm_groups == 4
    assert ae.config.to_dict() == {**SMALL_AE, "in_channels": 3, "out_ch": 3, "attn_resolutions": [],
                                   "dropout": 0.0, "double_z": True, "scale_factor": 0.18215} | {
        "norm_groups": 4}


@pytest.mark.parametrize(("cls", "config", "field"), [
    (TriffuserConfig, {**SMALL_NET, "bogus": 1}, "bogus"),
    (TriffuserConfig, {**SMALL_NET, "depth": 3}, "depth"),
    (TriffuserConfig, {**SMALL_NET, "img_size": 5}, "img_size"),
    (TriffuserConfig, {**SMALL_NET, "embed_dim": "wide"}, "embed_dim"),
    (TriffuserConfig, {**SMALL_NET, "name": "uvit"}, "name"),
    (TriffuserConfig, {**SMALL_NET, "attn_drop_rate": 0.1}, "attn_drop_rate"),
    (AutoencoderConfig, {k: v for k, v in SMALL_AE.items() if k != "resolution"}, "resolution"),
    (AutoencoderConfig, {**SMALL_AE, "ch_mult": [1, "x"]}, "ch_mult"),
    (AutoencoderConfig, {**SMALL_AE, "double_z": False}, "double_z"),
    (AutoencoderConfig, {**SMALL_AE, "norm_groups": 0}, "norm_groups"),
])
def test_invalid_configs_name_the_field(cls, config, field):
    with pytest.raises(ConfigError, match=f"{cls.__name__}.*'{field}'"):
        cls.from_dict(config)


def test_saved_checkpoints_record_the_config_and_loading_uses_it(tmp_path):
    torch.manual_seed(0)
    cfg = TriffuserConfig(**SMALL_NET, use_checkpoint=True)
    path = tmp_path / "net.safetensors"
    save_checkpoint(Triffuser.from_config(cfg).state_dict(), path, cfg)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()[CONFIG_KEY]) == cfg.to_dict()
    (tmp_path / "net.json").unlink()  # the header alone carries it
    net = load_network(path)
    assert net.config == cfg and net.checkpoint_info.config_source == "safetensors header"

    ae_cfg = AutoencoderConfig.from_dict(SMALL_AE)
    save_checkpoint(AutoencoderKL.from_config(ae_cfg).state_dict(), tmp_path / "ae.safetensors", ae_cfg)
    ae = load_autoencoder(tmp_path / "ae.safetensors")
    assert ae.config == ae_cfg and ae.checkpoint_info.config_source.endswith("ae.json")
    assert ae.checkpoint_info.config == ae_cfg.to_dict()
    (tmp_path / "config.json").write_text("{not json")  # a folder's shared file: <name>.json wins unread
    assert load_autoencoder(tmp_path / "ae.safetensors").config == ae_cfg


def test_a_broken_recorded_config_names_the_key(tmp_path):
    state = Triffuser(**SMALL_NET).state_dict()
    save_file(state, tmp_path / "net.safetensors", metadata={CONFIG_KEY: "{not json"})
    with pytest.raises(CheckpointError, match=r"net.safetensors: safetensors metadata key 'config' is not"):
        load_network(tmp_path / "net.safetensors")
    broken = json.dumps({**SMALL_NET, "depth": 3})
    save_file(state, tmp_path / "net.safetensors", metadata={CONFIG_KEY: broken})
    with pytest.raises(CheckpointError, match=r"invalid config .*safetensors header.*field 'depth'"):
        load_network(tmp_path / "net.safetensors")
