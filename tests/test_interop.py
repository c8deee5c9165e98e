"""Import of official Rectified Flow checkpoints: conformance with the official code, and errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import OFFICIAL_FIXTURES, RF_CIFAR10_KEYS

from traflow_cli.interop import (
    CheckpointFormatError,
    ncsnpp_config_from_state_dict,
    read_rectified_flow_checkpoint,
)
from traflow_cli.nets.ncsnpp import NCSNpp

CONFORMANCE = OFFICIAL_FIXTURES
SMALL_CKPT = CONFORMANCE["official-nf12"][0]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def run_imported(ckpt: Path, io: dict[str, Any], image_size: int, use_ema: bool = True):
    config, state_dict = read_rectified_flow_checkpoint(
        ckpt, image_size=image_size, use_ema=use_ema
    )
    net = NCSNpp(**config).eval()
    net.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return config, net(io["x"], io["t"])


@pytest.mark.parametrize("name", list(CONFORMANCE))
def test_matches_official_network(name: str):
    ckpt, io_path, image_size = CONFORMANCE[name]
    assert ckpt.is_file() and io_path.is_file(), f"fixture missing: {ckpt} / {io_path}"
    io = torch.load(io_path, map_location="cpu", weights_only=True)
    config, out = run_imported(ckpt, io, image_size)
    official = io["config"]
    assert config == dict(
        image_size=official["image_size"], in_channels=3, nf=official["nf"],
        ch_mult=tuple(official["ch_mult"]), num_res_blocks=official["num_res_blocks"],
        attn_resolutions=tuple(official["attn_resolutions"]), dropout=0.1, num_classes=0,
    )
    assert out.dtype == torch.float32
    assert rel_err(out, io["v"]) < 1e-5


def test_ema_and_raw_weights_are_told_apart():
    ckpt, io_path, image_size = CONFORMANCE["official-nf12"]
    io = torch.load(io_path, map_location="cpu", weights_only=True)
    _, raw = run_imported(ckpt, io, image_size, use_ema=False)
    assert rel_err(raw, io["v_raw"]) < 1e-5
    assert rel_err(io["v_raw"], io["v"]) > 1e-3  # the fixture's EMA really differs


def test_config_inferred_from_official_cifar10_keys():
    spec = json.loads(RF_CIFAR10_KEYS.read_text())
    with torch.device("meta"):
        state_dict = {k: torch.empty(shape) for k, shape in spec["keys"]}
    config = ncsnpp_config_from_state_dict(state_dict)
    assert config == dict(
        image_size=32, in_channels=3, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4,
        attn_resolutions=(16,), dropout=0.1, num_classes=0,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(nf=8, ch_mult=(1,), num_res_blocks=2, attn_resolutions=(), image_size=8),
        dict(nf=8, ch_mult=(2, 1, 3), num_res_blocks=3, attn_resolutions=(16, 4), image_size=16),
        dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16,
             in_channels=1, num_classes=5),
    ],
)
def test_config_round_trips_through_our_own_state_dicts(kwargs: dict[str, Any]):
    with torch.device("meta"):
        net = NCSNpp(**kwargs, dropout=0.1)
        student = NCSNpp(**kwargs, dropout=0.1, target_time=True)
    expected = dict(in_channels=3, num_classes=0, dropout=0.1) | kwargs
    size = kwargs["image_size"]
    assert ncsnpp_config_from_state_dict(net.state_dict(), image_size=size) == expected
    assert ncsnpp_config_from_state_dict(student.state_dict(), image_size=size) == expected


# ---- errors: each a CheckpointFormatError with a one-line message -------------------------


class FakeEDMNetwork:
    """Stands in for the persistent-class objects an EDM/StyleGAN pickle holds."""


@pytest.fixture(scope="module")
def official() -> dict[str, Any]:
    return torch.load(SMALL_CKPT, map_location="cpu", weights_only=True)


def edited(official: dict[str, Any], tmp_path: Path, edit) -> Path:
    """Save a copy of the official checkpoint after edit(ckpt) changed it."""
    ckpt = dict(official)
    ckpt["model"] = dict(official["model"])
    ckpt["ema"] = dict(official["ema"], shadow_params=list(official["ema"]["shadow_params"]))
    edit(ckpt)
    path = tmp_path / "edited.pth"
    torch.save(ckpt, path)
    return path


def expect_error(path: Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(CheckpointFormatError) as info:
        read_rectified_flow_checkpoint(path, image_size=16, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_error_missing_file(tmp_path: Path):
    expect_error(tmp_path / "nope.pth", "no such file", "nope.pth")


def test_error_truncated_checkpoint(tmp_path: Path):
    data = SMALL_CKPT.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "truncated or not a PyTorch checkpoint")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_error_not_a_checkpoint(tmp_path: Path, content: bytes):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    expect_error(path, "truncated or not a PyTorch checkpoint")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_error_edm_style_pickle(tmp_path: Path, protocol: int):
    path = tmp_path / "network-snapshot.pkl"
    with path.open("wb") as f:
        pickle.dump({"ema": FakeEDMNetwork(), "augment_pipe": None}, f, protocol=protocol)
    expect_error(path, "EDM", "traflow imports Rectified Flow .pth checkpoints")


def test_error_pickled_module(tmp_path: Path):
    path = tmp_path / "whole_module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    expect_error(path, "pickled Python objects", "Rectified Flow .pth")


def test_error_not_a_dict(tmp_path: Path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    expect_error(path, "expected a dict", "found a list")


def test_error_no_model_entry(tmp_path: Path, official: dict[str, Any]):
    path = tmp_path / "ema_only.pth"
    torch.save({"ema": official["ema"], "step": 1}, path)
    expect_error(path, "'model'", "found keys ['ema', 'step']")


def test_error_no_ema_entry(tmp_path: Path, official: dict[str, Any]):
    path = edited(official, tmp_path, lambda c: c.pop("ema"))
    expect_error(path, "shadow_params", "use_ema=False")
    config, _ = read_rectified_flow_checkpoint(path, image_size=16, use_ema=False)
    assert config["nf"] == 12


def test_error_shadow_param_count(tmp_path: Path, official: dict[str, Any]):
    path = edited(official, tmp_path, lambda c: c["ema"]["shadow_params"].pop())
    expect_error(path, "expected 154 EMA shadow params", "found 153")


def test_error_shape_mismatch_in_model(tmp_path: Path, official: dict[str, Any]):
    key = "module.all_modules.3.Dense_0.weight"

    def corrupt(c: dict[str, Any]) -> None:
        c["model"][key] = torch.zeros(5, 48)

    message = expect_error(edited(official, tmp_path, corrupt), "'all_modules.3.Dense_0.weight'")
    assert "expected [12, 48]" in message and "found [5, 48]" in message


def test_error_shape_mismatch_in_ema(tmp_path: Path, official: dict[str, Any]):
    def corrupt(c: dict[str, Any]) -> None:
        c["ema"]["shadow_params"][2] = torch.zeros(3, 3)  # all_modules.1.weight

    message = expect_error(edited(official, tmp_path, corrupt), "'all_modules.1.weight'")
    assert "expected [48, 48]" in message and "found [3, 3]" in message


def test_error_unexpected_key(tmp_path: Path, official: dict[str, Any]):
    def add(c: dict[str, Any]) -> None:
        c["model"]["module.all_modules.3.Extra_0.weight"] = torch.zeros(1)

    expect_error(edited(official, tmp_path, add), "unexpected key 'all_modules.3.Extra_0.weight'")


def test_error_missing_key(tmp_path: Path, official: dict[str, Any]):
    def drop(c: dict[str, Any]) -> None:
        del c["model"]["module.all_modules.3.GroupNorm_1.bias"]

    expect_error(edited(official, tmp_path, drop), "'all_modules.3.GroupNorm_1.bias'", "missing")



def test_error_state_dict_of_another_architecture():
    with pytest.raises(CheckpointFormatError, match="all_modules"):
        ncsnpp_config_from_state_dict({"net.0.weight": torch.zeros(4, 4)})
