"""Bounds on a network description read from a file, checked before anything is built.

A description that comes from a file (a checkpoint's ``net_config`` metadata, the settings in an
EDM pickle, the shapes of a Rectified Flow state dict) is untrusted: ``hidden = 16000`` or a
thousand-level ``channel_mult`` would allocate gigabytes, or take minutes to build even on the
meta device. ``check_net_limits`` bounds every structural setting (types, levels, blocks,
widths, resolution) generously, about ten times past the largest published networks traflow
reads (EDM's ImageNet-64 ADM, Rectified Flow's 256-pixel NCSN++), so that the description
builds on the meta device in well under a second. The real bound on a network read from a file
is the file itself: the readers then check the built network's tensors against the file's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_LEVELS", "check_net_limits"]

MAX_LEVELS = 10            # resolution levels of a U-Net (len(ch_mult) / len(channel_mult))
MAX_BLOCKS = 32            # residual blocks per level; MLP depth
MAX_WIDTH = 1 << 16        # channels of any layer (nf * mult, model_channels * mult, hidden)
MAX_RESOLUTION = 4096
MAX_IN_CHANNELS = 1024
MAX_CLASSES = 1 << 20
MAX_LIST = 16              # attn_resolutions, resample_filter

# field: (smallest, largest); every integer setting of the three network kinds.
_INTS: dict[str, tuple[int, int]] = {
    "dim": (1, MAX_WIDTH), "hidden": (1, MAX_WIDTH), "depth": (1, MAX_BLOCKS * 8),
    "time_dim": (1, MAX_WIDTH), "image_size": (1, MAX_RESOLUTION),
    "in_channels": (1, MAX_IN_CHANNELS), "nf": (1, MAX_WIDTH),
    "num_res_blocks": (1, MAX_BLOCKS), "num_classes": (0, MAX_CLASSES),
    "model_channels": (1, MAX_WIDTH), "num_blocks": (1, MAX_BLOCKS),
    "augment_dim": (0, 1024), "channel_mult_emb": (1, 64), "channel_mult_noise": (1, 64),
    "M": (2, 1 << 24),
}
# field: (longest, largest entry); lists of integers
_INT_LISTS: dict[str, tuple[int, int]] = {
    "ch_mult": (MAX_LEVELS, 64), "channel_mult": (MAX_LEVELS, 64),
    "attn_resolutions": (MAX_LIST, MAX_RESOLUTION),
}
_WIDTHS = (("nf", "ch_mult"), ("model_channels", "channel_mult"))


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _check_section(section: Mapping[str, Any], where: str) -> None:
    for key, value in section.items():
        field = f"{where}.{key}"
        if key in _INTS:
            low, high = _INTS[key]
            if not _is_int(value) or not low <= value <= high:
                raise ValueError(f"{field} is {_show(value)}; a network read from a file must "
                                 f"have an integer from {low} to {high} there")
        elif key in _INT_LISTS:
            longest, largest = _INT_LISTS[key]
            if (not isinstance(value, list | tuple) or len(value) > longest
                    or not all(_is_int(v) and 1 <= v <= largest for v in value)):
                raise ValueError(f"{field} is {_show(value)}; expected at most {longest} integers "
                                 f"from 1 to {largest}")
        elif key == "resample_filter":
            if (not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_LIST
                    or not all(_is_number(v) for v in value)):
                raise ValueError(f"{field} is {_show(value)}; expected 1 to {MAX_LIST} numbers")
        elif key in ("precond", "model"):
            if not isinstance(value, Mapping):
                raise ValueError(f"{field} is {_show(value)}; expected a table of settings")
            _check_section(value, field)
        elif isinstance(value, float | int) and not isinstance(value, bool):
            if not math.isfinite(value) or abs(value) > 1e30:
                raise ValueError(f"{field} is {_show(value)}; expected a finite number")
        elif value is not None and not isinstance(value, str | bool):
            raise ValueError(f"{field} is {_show(value)}; expected a number, a word or null")
        elif isinstance(value, str) and len(value) > 64:
            raise ValueError(f"{field} is a {len(value)}-character string; expected a short word")
    for width, mults in _WIDTHS:
        base, levels = section.get(width), section.get(mults)
        if _is_int(base) and isinstance(levels, list | tuple) and levels:
            widest = base * max(levels)
            if widest > MAX_WIDTH:
                raise ValueError(f"{where}.{width} * max({where}.{mults}) is {widest} channels; "
                                 f"a network read from a file may have at most {MAX_WIDTH}")


def _show(value: Any) -> str:
    """A short description of a value for an error line (never the repr of a huge structure)."""
    if isinstance(value, bool | int | float) or value is None:
        text = repr(value)
        return text if len(text) <= 40 else f"an integer of {len(text)} digits"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a {len(value)}-character string"
    if isinstance(value, list | tuple | Mapping):
        return f"a {type(value).__name__} of {len(value)} entries"
    return f"a {type(value).__name__}"


def check_net_limits(config: Mapping[str, Any], where: str = "net_config") -> None:
    """Raise ValueError (one line naming the field, e.g. ``net_config.hidden``) when a network
    description has a setting of the wrong type or beyond the bounds above."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{where} is {_show(config)}; expected a table of network settings")
    _check_section(config, where)

