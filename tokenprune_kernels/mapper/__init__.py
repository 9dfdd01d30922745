"""The mapper: a tiny 1-D conv network that scores visual tokens from layer-0 attention.

- :func:`mapper_forward_ref`: plain-PyTorch reference of stage b of ``docs/contract.md`` on packed
  (varlen) batches; :func:`mapper_param_names` / :func:`validate_mapper_params` describe and
  check its flat parameter list; :func:`grid_positions` the optional grid input.
- :class:`MapperConfig`, :class:`TokenMapper`: the trainable module (padded batches for training,
  packed batches through the reference).
- :func:`save_mapper`, :func:`load_mapper`: ``.safetensors`` + JSON config, never pickle.
"""

from .functional import (
    grid_positions,
    mapper_forward_ref,
    mapper_param_names,
    validate_mapper_params,
)
from .io import load_mapper, save_mapper
from .model import MapperConfig, TokenMapper

__all__ = [
    "MapperConfig",
    "TokenMapper",
    "grid_positions",
    "load_mapper",
    "mapper_forward_ref",
    "mapper_param_names",
    "save_mapper",
    "validate_mapper_params",
]
