"""Saving and loading mappers as ``.safetensors`` plus a JSON config. No pickle anywhere.

``save_mapper(model, "m.safetensors")`` writes

- ``m.safetensors``: the parameters keyed by :func:`mapper_param_names`, contiguous float32, with
  the config JSON string in the file's metadata under :data:`CONFIG_METADATA_KEY`;
- ``m.json``: the same config (:meth:`MapperConfig.to_dict`), for people and tools to read.

``load_mapper`` reads the config from ``m.json`` when it exists (and then checks it against the
metadata copy when that exists too), else from the metadata. It trusts neither before the file's
tensors back it: the stored names, shapes and dtypes (read from the safetensors header, nothing
loaded) must be those of a mapper with that config before any tensor is loaded or any module
built, so a small file whose config asks for huge channels fails with a clear error instead of
allocating them; loaded tensors must be finite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .functional import mapper_param_names
from .model import MapperConfig, TokenMapper

__all__ = ["CONFIG_METADATA_KEY", "config_path_for", "load_mapper", "save_mapper"]

#: Key of the config JSON string in the safetensors metadata.
CONFIG_METADATA_KEY = "tokenprune_mapper_config"

_SUFFIX = ".safetensors"


def _checked_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix.lower() != _SUFFIX:
        raise ValueError(f"mapper path must end with '{_SUFFIX}', got '{path}'")
    return path


def config_path_for(path: str | os.PathLike[str]) -> Path:
    """The JSON config path beside a mapper file: same stem, ``.json``."""
    return _checked_path(path).with_suffix(".json")


def save_mapper(model: TokenMapper, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` (``.safetensors``) and its config to the ``.json`` beside it.

    Tensors are stored on the CPU as contiguous float32 under the names of
    :func:`mapper_param_names`; the config JSON is stored both beside the file and in its
    metadata. An existing file of either name is overwritten.
    """
    if not isinstance(model, TokenMapper):
        raise TypeError(f"model must be a TokenMapper, got {type(model).__name__}")
    path = _checked_path(path)
    config_json = json.dumps(model.config.to_dict(), sort_keys=True)
    tensors = {
        name: tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for name, tensor in model.named_op_params()
    }
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: config_json})
    config_path_for(path).write_text(
        json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _parse_config(text: str, source: str) -> MapperConfig:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"mapper config in {source} is not valid JSON: {err}") from err
    try:
        return MapperConfig.from_dict(data)
    except ValueError as err:
        raise ValueError(f"bad mapper config in {source}: {err}") from err


def _expected_shapes(config: MapperConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a mapper with ``config``, in the op's order, from a
    module built on the meta device: no memory is allocated, however large the config."""
    with torch.device("meta"):
        model = TokenMapper(config)
    return {name: tuple(p.shape) for name, p in model.named_op_params()}


def _check_stored_tensors(
    f: Any, expected: dict[str, tuple[int, ...]], path: Path, config: MapperConfig
) -> None:
    """Compare the names, shapes and dtypes stored in the open safetensors file ``f`` (read from
    its header, nothing loaded) with ``expected``; one ``ValueError`` names the file and lists
    every problem."""
    stored = set(f.keys())
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected))
    misshaped = []
    wrong_dtype = []
    for name in sorted(stored & set(expected)):
        tensor_slice = f.get_slice(name)
        shape = tuple(tensor_slice.get_shape())
        if shape != expected[name]:
            misshaped.append(f"{name}: expected {list(expected[name])}, got {list(shape)}")
        dtype = tensor_slice.get_dtype()
        if dtype != "F32":
            wrong_dtype.append(f"{name}: {dtype}")
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors [{'; '.join(misshaped)}]")
    if wrong_dtype:
        problems.append(f"tensors that are not float32 (F32) [{'; '.join(wrong_dtype)}]")
    if problems:
        raise ValueError(
            f"'{path}' does not match a mapper with {config} "
            f"(expected tensors {mapper_param_names(config.num_blocks)}): " + ", ".join(problems)
        )


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Reject NaN / inf weights: every score of such a mapper is NaN and top-k would keep the
    first tokens silently. The error names the file and each bad tensor."""
    bad = []
    for name, tensor in state.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(tensor).sum())
            n_inf = int((~finite).sum()) - n_nan
            bad.append(f"{name}: {n_nan} NaN, {n_inf} inf of {tensor.numel()}")
    if bad:
        raise ValueError(f"'{path}' holds non-finite mapper weights [{'; '.join(bad)}]")


def load_mapper(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> TokenMapper:
    """Load a mapper written by :func:`save_mapper`; returns it on ``device`` in eval mode.

    The config comes from the ``.json`` beside ``path`` or, when that file is missing, from the
    safetensors metadata; when both exist they must agree.

    Raises:
        ValueError: ``path`` does not end in ``.safetensors``; the file is not a valid safetensors
            file; no config is found; the JSON and metadata configs differ; tensors are missing,
            unexpected, mis-shaped or not float32 (checked before anything is allocated), or hold
            NaN / inf values (each list names the tensors; every message names the file).
        FileNotFoundError: ``path`` does not exist.
    """
    path = _checked_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mapper file not found: '{path}'")
    json_path = config_path_for(path)

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            meta_text = metadata.get(CONFIG_METADATA_KEY)
            json_config = (
                _parse_config(json_path.read_text(encoding="utf-8"), f"'{json_path}'")
                if json_path.is_file()
                else None
            )
            meta_config = (
                None
                if meta_text is None
                else _parse_config(meta_text, f"the metadata of '{path}' ({CONFIG_METADATA_KEY})")
            )
            configs = [c for c in (json_config, meta_config) if c is not None]
            if not configs:
                raise ValueError(
                    f"no mapper config for '{path}': neither '{json_path}' nor the "
                    f"'{CONFIG_METADATA_KEY}' metadata entry exists"
                )
            if len(configs) == 2 and configs[0] != configs[1]:
                raise ValueError(
                    f"mapper config mismatch: '{json_path}' says {json_config} but the metadata "
                    f"of '{path}' says {meta_config}"
                )
            config = configs[0]
            expected = _expected_shapes(config)
            _check_stored_tensors(f, expected, path, config)
            state = {name: f.get_tensor(name) for name in expected}
    except SafetensorError as err:
        raise ValueError(f"'{path}' is not a valid safetensors file: {err}") from err

    _check_finite(state, path)
    model = TokenMapper(config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
