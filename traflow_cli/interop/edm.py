"""NVlabs/edm snapshots -> a traflow network description and its weights, checked in full.

A training snapshot (``network-snapshot-*.pkl``, and the official ``edm-*.pkl`` files) is
``dict(ema=<precond module>, loss_fn=..., augment_pipe=..., dataset_kwargs=...)``; traflow takes
``ema``. It is read as data (``edm_pickle``); its preconditioning (EDMPrecond, VPPrecond,
VEPrecond) and U-Net (SongUNet, DhariwalUNet) are rebuilt from their class names and init
keyword arguments as our own ``nets.edm.EDMNet``, whose state-dict names are EDM's, and every
tensor is checked by name and shape against it. Every failure is one line.

The file is untrusted: its settings are bounded (``nets.limits``) before anything is built, the
network they describe may hold no more values than the file's bytes can, and the weights must
be finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from traflow_cli.interop.edm_pickle import ModuleState, PersistentObject, load_network_pickle
from traflow_cli.interop.rectified_flow import CheckpointFormatError, check_finite
from traflow_cli.nets.edm import EDMNet
from traflow_cli.nets.limits import check_net_limits

__all__ = ["EDMSnapshot", "check_edm_weights", "edm_state_dict", "read_edm_snapshot"]

# Each preconditioning's positional parameters (EDM's signatures) and its own keyword arguments;
# everything else it was given went to the U-Net.
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16")
_PRECONDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # class name: (our kind, its own parameters, default model_type)
    "EDMPrecond": ("edm", ("sigma_min", "sigma_max", "sigma_data"), "DhariwalUNet"),
    "VPPrecond": ("vp", ("beta_d", "beta_min", "M", "epsilon_t"), "SongUNet"),
    "VEPrecond": ("ve", ("sigma_min", "sigma_max"), "SongUNet"),
}
_UNSUPPORTED_PRECONDS = ("iDDPMPrecond",)
_COMMON_SETTINGS = ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb",
                    "num_blocks", "attn_resolutions", "dropout", "label_dropout")
_UNET_SETTINGS = {
    "SongUNet": _COMMON_SETTINGS + ("embedding_type", "channel_mult_noise", "encoder_type",
                                    "decoder_type", "resample_filter"),
    "DhariwalUNet": _COMMON_SETTINGS,
}
_UNET_INTERFACE = ("img_resolution", "in_channels", "out_channels", "label_dim")


@dataclass
class EDMSnapshot:
    """What an EDM snapshot holds, in traflow's terms."""

    config: dict[str, Any]          # build_net config: {"kind": "edm", ...}
    weights: dict[str, Tensor]      # EMA state dict, EDM's names, float32 on the CPU
    precond_class: str              # EDMPrecond | VPPrecond | VEPrecond
    model_class: str                # SongUNet | DhariwalUNet
    use_fp16: bool                  # the file's setting (traflow's runtime decides precision)


def _fail(path: Path, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {message}")


_MAX_SETTING_VALUES = 256  # values in one init argument (channel_mult, resample_filter, ...)
_MAX_MODULE_DEPTH = 32     # nesting of modules in a network (EDM's are 4 deep)


def _plain(value: Any, budget: list[int] | None = None) -> Any:
    """JSON-friendly copy of an init argument (tuples become lists) of at most 256 values in
    all: a pickle's shared references (a list that holds itself, lists of the same list) cannot
    make the copy expand."""
    budget = [_MAX_SETTING_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"an init argument holds more than {_MAX_SETTING_VALUES} values, more "
                         "than any network setting")
    if isinstance(value, tuple | list):
        return [_plain(v, budget) for v in value]
    return value


def _kwargs(record: PersistentObject, positional: tuple[str, ...], path: Path,
            where: str) -> dict[str, Any]:
    """The record's init arguments as keywords (positional ones named by EDM's signature)."""
    args, kwargs = record.init_args, record.init_kwargs
    if not all(isinstance(name, str) for name in kwargs):
        raise _fail(path, f"{where} ({record.class_name}) has init keyword arguments that are not "
                          "names")
    if len(args) > len(positional):
        raise _fail(path, f"{where} ({record.class_name}) was built with {len(args)} positional "
                          f"arguments; EDM's signature names only {len(positional)}")
    for name, value in zip(positional, args, strict=False):
        kwargs.setdefault(name, value)
    return kwargs


def _precond_section(record: PersistentObject, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """({"kind": ..., parameters}, the precond's remaining kwargs) for snapshot['ema']."""
    kind, own, _ = _PRECONDS[record.class_name]
    kwargs = _kwargs(record, _PRECOND_POSITIONAL, path, "snapshot['ema']")
    section: dict[str, Any] = {"kind": kind}
    for name in own:
        if name in kwargs:
            try:
                section[name] = _plain(kwargs.pop(name))
            except ValueError as err:
                raise _fail(path, f"{record.class_name} setting {name!r}: {err}") from None
    sigma_max = section.get("sigma_max")
    if kind == "edm" and isinstance(sigma_max, float) and math.isinf(sigma_max) and sigma_max > 0:
        section["sigma_max"] = None  # EDM's default: no upper limit
    return section, kwargs


def _unet_section(record: PersistentObject, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """({"type": ..., settings}, the interface arguments) for snapshot['ema'].model."""
    kwargs = _kwargs(record, _UNET_INTERFACE, path, "snapshot['ema'].model")
    allowed = _UNET_SETTINGS[record.class_name]
    interface = {name: kwargs.pop(name, None) for name in _UNET_INTERFACE}
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise _fail(path, f"{record.class_name} setting {unknown[0]!r} is not one traflow knows "
                          f"(known: {', '.join(allowed)})")
    settings: dict[str, Any] = {"type": record.class_name}
    for name, value in kwargs.items():
        try:
            settings[name] = _plain(value)
        except ValueError as err:
            raise _fail(path, f"{record.class_name} setting {name!r}: {err}") from None
    return settings, interface


def _network_config(ema: PersistentObject, path: Path) -> tuple[dict[str, Any], bool]:
    """The build_net config of snapshot['ema'] and its use_fp16 flag."""
    if ema.class_name in _UNSUPPORTED_PRECONDS:
        raise _fail(path, f"snapshot['ema'] is an {ema.class_name} network, which traflow does "
                          f"not import; supported: {', '.join(_PRECONDS)}")
    if ema.class_name not in _PRECONDS:
        raise _fail(path, f"unknown network class {ema.class_name!r} in snapshot['ema']; "
                          f"traflow imports {', '.join(_PRECONDS)} networks")
    precond, rest = _precond_section(ema, path)
    modules = ema.state.get("_modules")
    inner = modules.get("model") if isinstance(modules, Mapping) else None
    if not isinstance(inner, PersistentObject):
        raise _fail(path, f"snapshot['ema'] ({ema.class_name}) holds no pickled U-Net under "
                          "'model'")
    model_type = rest.get("model_type", _PRECONDS[ema.class_name][2])
    if not isinstance(model_type, str):
        raise _fail(path, f"snapshot['ema'] names a model_type that is a "
                          f"{type(model_type).__name__}, not a class name")
    if inner.class_name not in _UNET_SETTINGS:
        raise _fail(path, f"unknown network class {inner.class_name!r} in snapshot['ema'].model; "
                          f"traflow imports {', '.join(_UNET_SETTINGS)}")
    if inner.class_name != model_type:
        raise _fail(path, f"snapshot['ema'] names model_type {model_type!r} but holds a "
                          f"{inner.class_name}")
    model, interface = _unet_section(inner, path)
    for name, value in interface.items():
        if not (type(value) is int or (name == "label_dim" and value is None)):
            raise _fail(path, f"snapshot['ema'].model setting {name!r} is a "
                              f"{type(value).__name__}, not an integer")
    resolution, channels = interface["img_resolution"], interface["in_channels"]
    if interface["out_channels"] != channels:
        raise _fail(path, f"the U-Net maps {channels} channels to {interface['out_channels']}; "
                          "a denoiser keeps its channel count")
    config = {"kind": "edm", "image_size": resolution, "in_channels": channels,
              "num_classes": interface["label_dim"] or 0, "precond": precond, "model": model}
    try:
        check_net_limits(config, where="snapshot['ema']")
    except ValueError as err:
        raise _fail(path, f"{err}") from None
    use_fp16 = rest.get("use_fp16", False)
    if type(use_fp16) not in (bool, int):
        raise _fail(path, f"snapshot['ema'] setting 'use_fp16' is a {type(use_fp16).__name__}, "
                          "not a flag")
    return config, bool(use_fp16)


def edm_state_dict(record: PersistentObject | ModuleState, prefix: str = "",
                   depth: int = 0) -> dict[str, Tensor]:
    """The state dict of a pickled module tree: persistent parameters and buffers, by name."""
    if depth > _MAX_MODULE_DEPTH:
        raise ValueError(f"{prefix or 'the network'} nests modules more than "
                         f"{_MAX_MODULE_DEPTH} deep (or contains itself)")
    state = record.state
    skipped = state.get("_non_persistent_buffers_set", set())
    if not isinstance(skipped, set | frozenset | list | tuple):
        raise ValueError(f"{prefix}_non_persistent_buffers_set is a {type(skipped).__name__}")
    out: dict[str, Tensor] = {}
    for group in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(group, {}), Mapping):
            raise ValueError(f"{prefix}{group} is a {type(state[group]).__name__}, not a dict")
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if not isinstance(name, str):
                raise ValueError(f"{prefix}{group} has a key that is a {type(name).__name__}")
            if value is None or (group == "_buffers" and name in skipped):
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentObject | ModuleState) or not isinstance(name, str):
            raise ValueError(f"{prefix}{name} is a {type(child).__name__}, not a module")
        out.update(edm_state_dict(child, f"{prefix}{name}.", depth + 1))
    return out


def check_edm_weights(config: dict[str, Any], weights: Mapping[str, Tensor], path: Path) -> None:
    """Every name and shape of our EDMNet(config) against the file's tensors (built on meta);
    raises CheckpointFormatError naming the first difference."""
    try:
        check_net_limits(config, where="snapshot['ema']")
        with torch.device("meta"):
            net = EDMNet(**{k: v for k, v in config.items() if k != "kind"})
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, IndexError, OverflowError,
            KeyError, AttributeError) as err:
        raise _fail(path, f"its network settings build no network ({type(err).__name__}: "
                          f"{str(err)[:200]})") from None
    expected = {name: value.shape for name, value in net.state_dict().items()}
    # Every value of the network is in the file (EDM stores float32; 2 bytes is the least any
    # float takes), so a network larger than that is a description the file cannot back.
    values, size = sum(shape.numel() for shape in expected.values()), path.stat().st_size
    if 2 * values > size:
        raise _fail(path, f"its settings describe a network of {values} values, more than its "
                          f"{size} bytes can hold")
    missing = [name for name in expected if name not in weights]
    if missing:
        raise _fail(path, f"snapshot['ema'] lacks {missing[0]!r}, which its settings need "
                          f"({len(missing)} missing in all)")
    unexpected = [name for name in weights if name not in expected]
    if unexpected:
        raise _fail(path, f"snapshot['ema'] holds {unexpected[0]!r}, which its settings do not "
                          f"build ({len(unexpected)} unexpected in all)")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise _fail(path, f"shape mismatch at {name!r}: its settings build {list(shape)}, "
                              f"the file holds {list(weights[name].shape)}")
        if not weights[name].is_floating_point():
            raise _fail(path, f"{name!r} holds {weights[name].dtype} values, not floats")


def read_edm_snapshot(path: str | Path) -> EDMSnapshot:
    """Read snapshot['ema'] of an EDM pickle without running it; names and shapes checked."""
    path = Path(path)
    snapshot = load_network_pickle(path)
    if isinstance(snapshot, PersistentObject):
        found = f"a bare pickled {snapshot.class_name}"
    elif isinstance(snapshot, Mapping):
        found = f"a dict with keys {sorted(map(str, snapshot))}"
    else:
        found = f"a {type(snapshot).__name__}"
    if not isinstance(snapshot, Mapping) or "ema" not in snapshot:
        raise _fail(path, f"expected an EDM training snapshot, a dict with an 'ema' network, "
                          f"found {found}")
    ema = snapshot["ema"]
    if not isinstance(ema, PersistentObject):
        raise _fail(path, f"expected snapshot['ema'] to be a pickled EDM network, found a "
                          f"{type(ema).__name__}")
    try:
        config, use_fp16 = _network_config(ema, path)
    except CheckpointFormatError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, RecursionError) as err:
        raise _fail(path, f"snapshot['ema'] has malformed settings ({type(err).__name__}: "
                          f"{str(err)[:200]})") from None
    try:
        weights = edm_state_dict(ema)
    except (ValueError, TypeError, RecursionError) as err:
        raise _fail(path, f"snapshot['ema'] is malformed: {str(err)[:200]}") from None
    check_edm_weights(config, weights, path)
    check_finite(weights, path, "snapshot['ema']")
    return EDMSnapshot(config=config, weights={k: v.float().contiguous() for k, v in weights.items()},
                       precond_class=ema.class_name, model_class=config["model"]["type"],
                       use_fp16=use_fp16)
