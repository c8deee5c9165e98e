"""Strict import of foreign checkpoints: official Rectified Flow ``.pth`` files
(``rectified_flow``) and NVlabs/edm network pickles (``edm``, read as data by ``edm_pickle``)."""

from traflow_cli.interop.edm import EDMSnapshot, read_edm_snapshot
from traflow_cli.interop.edm_pickle import UnsafePickleError, load_network_pickle
from traflow_cli.interop.rectified_flow import (
    CheckpointFormatError,
    ncsnpp_config_from_state_dict,
    read_rectified_flow_checkpoint,
)

__all__ = [
    "CheckpointFormatError",
    "EDMSnapshot",
    "UnsafePickleError",
    "load_network_pickle",
    "ncsnpp_config_from_state_dict",
    "read_edm_snapshot",
    "read_rectified_flow_checkpoint",
]
