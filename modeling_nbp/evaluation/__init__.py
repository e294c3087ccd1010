"""Evaluation: reconstruction metrics (PSNR, SSIM) and the Fréchet Video Distance with an I3D network.

Names are imported from their submodules on first use, so `python -m modeling_nbp.evaluation.fvd` and
`python -m modeling_nbp.evaluation.convert_i3d_weights` run their module only once.
"""

import importlib

_EXPORTS = {
    "FVDCalculator": "fvd",
    "feature_statistics": "fvd",
    "frechet_distance": "fvd",
    "fvd_from_features": "fvd",
    "preprocess_videos": "fvd",
    "I3D": "i3d",
    "load_i3d": "i3d",
    "psnr": "reconstruction",
    "ssim": "reconstruction",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
