"""Strict import of official Rectified Flow checkpoints (gnobitab/RectifiedFlow ``.pth``).

An official checkpoint is ``torch.save({'model': ..., 'ema': ..., 'optimizer': ..., 'step': ...})``
where ``model`` is the state dict of a ``DataParallel``-wrapped score_sde ``NCSNpp`` (every key
prefixed ``module.``, plus a ``sigmas`` buffer of noise levels that Rectified Flow never uses)
and ``ema`` is ``ExponentialMovingAverage.state_dict()``: ``{'decay', 'num_updates',
'shadow_params'}`` with ``shadow_params`` a plain list of tensors in the order of the model's
``parameters()``. Nothing in the file names the architecture, so the network config is read
off the parameter names and shapes, then every name and shape is checked against
``NCSNpp(**config)``. Every failure is a ``CheckpointFormatError`` with a one-line message.

The file is untrusted and is not opened with ``torch.load``: ``tensor_pickle`` reads the
archive as data (allow-listed globals, no BUILD on tensors, every storage exactly its bytes,
no overlapping views, nothing expanding past the file's size); the inferred network is bounded
(``nets.limits``) before it is built, and the weights must be finite.
"""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from traflow_cli.errors import UserError, one_line
from traflow_cli.interop.tensor_pickle import (
    STORAGE_TYPES,
    BadContent,
    check_no_expansion,
    read_torch_zip,
)
from traflow_cli.nets.limits import check_net_limits
from traflow_cli.nets.ncsnpp import NCSNpp

__all__ = [
    "CheckpointFormatError",
    "check_finite",
    "ncsnpp_config_from_state_dict",
    "read_rectified_flow_checkpoint",
]

_DATA_PARALLEL_PREFIX = "module."
# Buffers of the official model that are not parameters (so not in the EMA shadow list) and
# that our NCSNpp does not carry: the SMLD noise levels, unused with scale_by_sigma=False.
_OFFICIAL_BUFFERS = ("sigmas",)
# Keys our NCSNpp adds outside the official all_modules list.
_S_BRANCH_PREFIX = "s_embed."
_CLASS_EMBED_KEY = "class_embed.weight"
_MODULE_KEY = re.compile(r"^all_modules\.(\d+)\.(.+)$")
_DEFAULT_DROPOUT = 0.1


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint is not what the importer expects; the message is one line."""


def _shape(shape: torch.Size | tuple[int, ...] | list[int]) -> list[int]:
    return list(shape)


# What a torch.save file of tensors names: containers, the tensor rebuild functions (bounds
# checked by tensor_pickle) and the storage classes (as dtypes).
_TORCH_ZIP_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "rebuild_parameter",
    ("torch", "Size"): tuple,
    **{("torch", name): storage for name, storage in STORAGE_TYPES.items()},
}


def _load(path: Path) -> Any:
    """The object in a torch.save zip archive, read as data (tensor_pickle), every failure
    turned into a one-line error."""
    if not path.is_file():
        raise CheckpointFormatError(
            f"expected a Rectified Flow .pth checkpoint at {path}, found no such file"
        )
    with path.open("rb") as f:
        # Pickles of protocol 2 and later (every EDM/StyleGAN pickle) open with PROTO, 0x80.
        is_pickle = f.read(1) == b"\x80"

    def refuse(module: str, name: str) -> CheckpointFormatError:
        # Any other global is a Python object, such as a pickled nn.Module: never loaded.
        return CheckpointFormatError(
            f"expected a Rectified Flow .pth checkpoint (a dict of tensors) at {path}, found "
            f"a PyTorch file of pickled Python objects (such as a whole nn.Module; it names "
            f"{module}.{name}); traflow imports Rectified Flow .pth checkpoints only"
        )

    if not zipfile.is_zipfile(path):
        if is_pickle:
            raise CheckpointFormatError(
                f"expected a Rectified Flow .pth checkpoint (a dict of tensors) at {path}, found "
                "a plain pickle of Python objects (it looks like an EDM/StyleGAN network pickle, "
                "or a legacy torch.save file); traflow imports Rectified Flow .pth checkpoints "
                "only (torch.save zip archives)"
            )
        raise CheckpointFormatError(
            f"expected a PyTorch checkpoint at {path}, found a file that is truncated or not "
            f"a PyTorch checkpoint (not a zip archive)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return read_torch_zip(archive, path.stat().st_size, _TORCH_ZIP_GLOBALS, refuse)
    except CheckpointFormatError:
        raise
    except BadContent as err:
        raise CheckpointFormatError(
            f"expected a Rectified Flow .pth checkpoint at {path}, found {one_line(err)}"
        ) from None
    except (RecursionError, MemoryError) as err:
        raise CheckpointFormatError(
            f"expected a Rectified Flow .pth checkpoint at {path}, found one too deeply nested "
            f"or too large for its size ({type(err).__name__})"
        ) from None
    except Exception as err:  # zip, EOF and unpickling failures of a damaged file
        raise CheckpointFormatError(
            f"expected a PyTorch checkpoint at {path}, found a file that is truncated or not "
            f"a PyTorch checkpoint ({type(err).__name__}: {one_line(err)[:120]})"
        ) from None


def check_finite(weights: Mapping[str, Tensor], path: Path, what: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run): one line naming the tensor."""
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointFormatError(
                f"{path}: {what} holds NaN or infinite values at {name!r} (the network it was "
                "saved from had diverged); import a checkpoint from before it diverged"
            )


def _strip_official(model: Mapping[str, Any]) -> dict[str, Tensor]:
    """Drop the DataParallel prefix and the unused official buffers; check value types."""
    out: dict[str, Tensor] = {}
    for key, value in model.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointFormatError(
                f"expected checkpoint['model'] to map names to tensors, found {key!r}: "
                f"{type(value).__name__}"
            )
        name = key.removeprefix(_DATA_PARALLEL_PREFIX)
        if name in _OFFICIAL_BUFFERS:
            if value.dim() != 1:
                raise CheckpointFormatError(
                    f"expected buffer {key!r} to be 1-D (noise levels), found shape "
                    f"{_shape(value.shape)}"
                )
            continue
        out[name] = value
    return out


def _compare(expected: Mapping[str, torch.Size], found: Mapping[str, Tensor], what: str) -> None:
    """Raise on the first missing, unexpected or wrongly shaped entry of ``found``."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointFormatError(
            f"expected {what} to hold {missing[0]!r} (NCSNpp needs it), found it missing "
            f"({len(missing)} missing in all)"
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise CheckpointFormatError(
            f"expected only NCSNpp weights in {what}, found unexpected key {unexpected[0]!r} "
            f"({len(unexpected)} unexpected in all)"
        )
    for key, shape in expected.items():
        if found[key].shape != shape:
            raise CheckpointFormatError(
                f"shape mismatch at {key!r} in {what}: expected {_shape(shape)}, found "
                f"{_shape(found[key].shape)}"
            )


def _expected_shapes(config: Mapping[str, Any], target_time: bool) -> dict[str, torch.Size]:
    """Names and shapes of NCSNpp(**config); built on the meta device, so no memory or init."""
    try:
        with torch.device("meta"):
            net = NCSNpp(**config, target_time=target_time)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, OverflowError) as err:
        raise CheckpointFormatError(
            f"expected weights of a buildable NCSNpp, found ones implying {dict(config)} "
            f"({one_line(err)[:200]})"
        ) from None
    return {k: v.shape for k, v in net.state_dict().items()}


def ncsnpp_config_from_state_dict(
    state_dict: Mapping[str, Tensor], image_size: int = 32
) -> dict[str, Any]:
    """NCSNpp keyword arguments read off the names and shapes of an NCSNpp state dict.

    Accepts official keys (``module.`` prefix and ``sigmas`` are ignored) or our own. Returns
    ``nf, ch_mult, num_res_blocks, attn_resolutions, in_channels, num_classes, dropout,
    image_size``. Two values are not recorded in weights: ``image_size`` (the convolutions are
    size-agnostic; it only fixes which resolutions the attention levels correspond to, so pass
    the size the network was trained at) and ``dropout`` (set to the default 0.1; it does not
    affect evaluation). ``target_time`` is not returned: pass it when building a student.
    The whole state dict is checked against ``NCSNpp(**config)``.
    """
    sd = {k.removeprefix(_DATA_PARALLEL_PREFIX): v for k, v in state_dict.items()}
    for name in _OFFICIAL_BUFFERS:
        sd.pop(name, None)
    config = _infer_config(sd, image_size)
    target_time = any(k.startswith(_S_BRANCH_PREFIX) for k in sd)
    _compare(_expected_shapes(config, target_time), sd, "the state dict")
    return config


def _infer_config(sd: Mapping[str, Tensor], image_size: int) -> dict[str, Any]:
    """The config of ncsnpp_config_from_state_dict, before the state dict is checked; tensors
    of an unexpected rank are one line too."""
    try:
        return _infer_config_unchecked(sd, image_size)
    except CheckpointFormatError:
        raise
    except (IndexError, ValueError, TypeError, KeyError) as err:
        raise CheckpointFormatError(
            f"expected NCSNpp weights, found tensors of unexpected shapes ({type(err).__name__}: "
            f"{one_line(err)[:120]})"
        ) from None


def _infer_config_unchecked(sd: Mapping[str, Tensor], image_size: int) -> dict[str, Any]:
    # Group the official weights by module index: {index: {local name: shape}}.
    modules: dict[int, dict[str, torch.Size]] = {}
    for key, value in sd.items():
        match = _MODULE_KEY.match(key)
        if match:
            modules.setdefault(int(match[1]), {})[match[2]] = value.shape
    count = len(modules)
    if count < 8 or sorted(modules) != list(range(count)):
        raise CheckpointFormatError(
            f"expected NCSNpp weights named all_modules.0 .. all_modules.N, found "
            f"{count} module indices ({sorted(modules)[:3]}...)"
        )

    def shape_of(index: int, local: str) -> torch.Size:
        if local not in modules[index]:
            raise CheckpointFormatError(
                f"expected 'all_modules.{index}.{local}' in an NCSNpp state dict, found "
                f"{sorted(modules[index])}"
            )
        return modules[index][local]

    nf = shape_of(0, "weight")[1]  # first time-embedding linear: [4 nf, nf]
    in_channels = shape_of(2, "weight")[1]  # input conv: [nf, in_channels, 3, 3]

    # Body: residual blocks ("R", with their in/out channels and whether the skip has a 1x1
    # conv) and attention blocks ("A"), between the input conv and the output norm + conv.
    body: list[tuple[str, int, int, bool]] = []
    for index in range(3, count - 2):
        local = modules[index]
        if "Conv_0.weight" in local:
            out_ch, in_ch = local["Conv_0.weight"][:2]
            body.append(("R", in_ch, out_ch, "Conv_2.weight" in local))
        elif "NIN_0.W" in local:
            body.append(("A", 0, 0, False))
        else:
            raise CheckpointFormatError(
                f"expected a residual or attention block at all_modules.{index}, found "
                f"parameters {sorted(local)}"
            )

    # A resampling block keeps its channels yet has a skip conv; there are 2 per level
    # boundary (one down, one up). Residual blocks number levels * (2 * num_res_blocks + 3).
    resamplers = sum(1 for kind, i, o, conv in body if kind == "R" and conv and i == o)
    blocks = sum(1 for kind, *_ in body if kind == "R")
    levels = resamplers // 2 + 1
    per_level, rem = divmod(blocks, levels)
    num_res_blocks = (per_level - 3) // 2
    if resamplers % 2 or rem or (per_level - 3) % 2 or num_res_blocks < 1:
        raise CheckpointFormatError(
            f"expected NCSNpp's block pattern, found {blocks} residual blocks of which "
            f"{resamplers} resample, which fits no (levels, num_res_blocks)"
        )

    # Walk the encoder: per level, num_res_blocks blocks (each maybe followed by attention),
    # then a down-sampling block except after the last level.
    ch_mult: list[int] = []
    attn_levels: list[int] = []
    pos = 0
    for level in range(levels):
        for block in range(num_res_blocks):
            kind, _, out_ch, _ = body[pos]
            if kind != "R":
                raise CheckpointFormatError(
                    f"expected a residual block at encoder level {level}, found attention"
                )
            pos += 1
            if block == 0:
                if out_ch % nf:
                    raise CheckpointFormatError(
                        f"expected level channels to be multiples of nf={nf}, found {out_ch}"
                    )
                ch_mult.append(out_ch // nf)
            if pos < len(body) and body[pos][0] == "A":
                pos += 1
                if block == 0:
                    attn_levels.append(level)
        if level != levels - 1:
            pos += 1

    config: dict[str, Any] = {
        "image_size": image_size,
        "in_channels": in_channels,
        "nf": nf,
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": tuple(image_size // 2**level for level in attn_levels),
        "dropout": _DEFAULT_DROPOUT,
        "num_classes": sd[_CLASS_EMBED_KEY].shape[0] if _CLASS_EMBED_KEY in sd else 0,
    }
    try:
        check_net_limits(config, where="the inferred NCSNpp")
    except ValueError as err:
        raise CheckpointFormatError(f"expected NCSNpp weights of a sane size, found {err}") from None
    return config


def read_rectified_flow_checkpoint(
    path: str | Path, *, image_size: int = 32, use_ema: bool = True
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Return (net_config, state_dict) for NCSNpp from an official Rectified Flow ``.pth``.

    ``net_config`` holds keyword arguments for ``NCSNpp(**net_config)``, inferred from names
    and shapes alone (see ``ncsnpp_config_from_state_dict``). ``state_dict`` holds the EMA
    weights (``use_ema=True``, what the official sampler evaluates) or the raw training
    weights, without the ``module.`` prefix or the ``sigmas`` buffer, every name and shape
    checked against ``NCSNpp(**net_config)``, so it loads with ``strict=True``.
    """
    path = Path(path)
    ckpt = _load(path)
    weights = _read_weights(ckpt, path, image_size=image_size, use_ema=use_ema)
    check_finite(weights[1], path, "checkpoint['ema']" if use_ema else "checkpoint['model']")
    return weights


def _read_weights(ckpt: Any, path: Path, *, image_size: int, use_ema: bool
                  ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """read_rectified_flow_checkpoint on the loaded object."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointFormatError(
            f"expected a dict with a 'model' entry in {path}, found a {type(ckpt).__name__}"
        )
    if "model" not in ckpt:
        raise CheckpointFormatError(
            f"expected a 'model' entry in {path} (an official Rectified Flow checkpoint), "
            f"found keys {sorted(map(str, ckpt))}"
        )
    if not isinstance(ckpt["model"], Mapping):
        raise CheckpointFormatError(
            f"expected checkpoint['model'] to be a state dict, found a "
            f"{type(ckpt['model']).__name__}"
        )
    model = _strip_official(ckpt["model"])
    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    try:
        check_no_expansion([*model.values(), *(v for v in (shadow if isinstance(shadow, list | tuple) else ())
                              if isinstance(v, Tensor))],
                           path.stat().st_size)
    except BadContent as err:
        raise CheckpointFormatError(f"expected a Rectified Flow .pth checkpoint at {path}, found "
                                    f"{err}") from None
    config = _infer_config(model, image_size)
    # Everything left in 'model' is a parameter, in the official parameters() order.
    _compare(_expected_shapes(config, target_time=False), model, "checkpoint['model']")
    if not use_ema:
        return config, model

    if not isinstance(shadow, list | tuple):
        raise CheckpointFormatError(
            f"expected checkpoint['ema']['shadow_params'] (a list of tensors) in {path}, found "
            f"{'no ema entry' if ema is None else type(shadow).__name__}; pass use_ema=False "
            f"to import the raw weights"
        )
    if len(shadow) != len(model):
        raise CheckpointFormatError(
            f"expected {len(model)} EMA shadow params (one per model parameter), found "
            f"{len(shadow)}"
        )
    weights: dict[str, Tensor] = {}
    for (name, param), value in zip(model.items(), shadow, strict=True):
        if not isinstance(value, Tensor):
            raise CheckpointFormatError(
                f"expected a tensor as the EMA shadow param of {name!r}, found "
                f"{type(value).__name__}"
            )
        if value.shape != param.shape:
            raise CheckpointFormatError(
                f"shape mismatch at {name!r} in checkpoint['ema']['shadow_params']: expected "
                f"{_shape(param.shape)}, found {_shape(value.shape)}"
            )
        weights[name] = value
    return config, weights
