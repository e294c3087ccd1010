"""Finite scalar quantization (FSQ, Mentzer et al. 2023) with the index math of the official NBP tokenizer.

Every latent channel i is squashed into a bounded range and rounded to one of `levels[i]` values; the code of
a position is the vector of those values, normalised by `levels // 2` to [-1, 1] (odd levels reach +1, even
levels stop one step below it), and its id is the mixed-radix number formed by the per-channel digits (channel
0 is the least significant digit). There is no learned codebook: the module has no parameters, and its
constants are non-persistent buffers, so it adds nothing to a state dict.

All tensors here are channel-last: `(..., len(levels))` for latents and codes, `(...)` for ids.
"""

import math

import torch
from torch import nn

from .value_checks import all_finite, is_integer, require

# Keeps the bounded value strictly inside the outermost rounding cells (official value).
_BOUND_EPS = 1e-3


def round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer in the forward pass; pass the gradient through unchanged (d/dx = 1)."""
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    """Parameter-free finite scalar quantizer.

    Args:
        levels: number of quantization levels per latent channel, e.g. `(8, 8, 8, 5, 5, 5)` (64000 codes,
            the official NBP tokenizer) or `(8, 5, 5, 5)` (1000 codes). Each level must be >= 2.
    """

    def __init__(self, levels):
        super().__init__()
        levels = tuple(levels)
        if len(levels) == 0 or not all(is_integer(n) and n >= 2 for n in levels):
            raise ValueError(f"`levels` must be a non-empty sequence of integers >= 2, e.g. (8, 5, 5, 5); got {levels}")
        self.levels = levels = tuple(int(n) for n in levels)
        # basis[i] = prod(levels[:i]): the place value of channel i in the id.
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        # Integer buffers: `module.to(dtype)` leaves them alone, so the quantizer math stays exact.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    @property
    def dim(self) -> int:
        """Number of latent channels the quantizer expects."""
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes, `prod(levels)`."""
        return math.prod(self.levels)

    def _half_width(self) -> torch.Tensor:
        # levels // 2, as float: the factor that maps integer digits to codes in [-1, 1].
        return (self._levels // 2).float()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash `z` (float32, channel-last) so that rounding yields exactly `levels[i]` integer values.

        Odd levels L give the integers -(L-1)/2 .. (L-1)/2; even levels are shifted by 0.5 (and the input by
        tan(0.5 / half_l), so that z = 0 still lands on 0) and give -L/2 .. L/2 - 1.
        """
        levels = self._levels.float()
        half_l = (levels - 1) * (1 - _BOUND_EPS) / 2
        offset = (self._levels % 2 == 0).float() * 0.5
        shift = torch.tan(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _check_latents(self, z: torch.Tensor, name: str) -> None:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor; got {type(z).__name__}"
                            f"{'' if not isinstance(z, torch.Tensor) else ' of dtype ' + str(z.dtype)}")
        if z.ndim == 0 or z.shape[-1] != self.dim:
            raise ValueError(f"`{name}` must have {self.dim} channels in its last dimension (one per FSQ level "
                             f"{self.levels}); got shape {tuple(z.shape)}")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize channel-last latents.

        Args:
            z: `(..., dim)` floating-point latents (any float dtype; the math runs in float32).

        Returns:
            codes: `(..., dim)` float32 values on the grid `k / (levels // 2)`, with straight-through
                gradients to `z` (the rounding passes the gradient unchanged).
            ids: `(...)` int64 codebook ids in `[0, codebook_size)`.

        Raises FloatingPointError for NaN or infinite latents (inside torch.compile: a device-side assert).
        """
        self._check_latents(z, "z")
        # NaN would round to an id far outside the codebook (INT64_MIN on CPU), infinity to a saturated code
        require(all_finite(z), FloatingPointError,
                f"`z` holds NaN or infinite values (dtype {z.dtype}): FSQ can make no valid ids from them")
        rounded = round_straight_through(self.bound(z.float()))
        half = self._half_width()  # `rounded` holds exact integers (x + (round(x) - x) is exact), digits on the grid
        return rounded / half, self._digits_to_indices(rounded.detach() + half)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Map grid codes `(..., dim)` to int64 ids `(...)`: id = sum_i (code_i * half_i + half_i) * basis_i. Each
        digit code_i * half_i + half_i is rounded to the nearest integer, which must lie in [0, levels[i])."""
        self._check_latents(codes, "codes")
        half = self._half_width()
        digits = torch.round(codes.detach().float() * half + half)
        inside = ((digits >= 0) & (digits < self._levels)).all()  # False for NaN
        require(inside, ValueError, f"`codes` must lie on the FSQ grid of levels {self.levels}: code_i = "
                                    "k / (levels[i] // 2) in [-1, 1] (even levels stop one step below +1), "
                                    "NaN refused")
        return self._digits_to_indices(digits)

    def _digits_to_indices(self, digits: torch.Tensor) -> torch.Tensor:
        """Integer-valued float digits `(..., dim)`, each in [0, levels[i]) -> int64 ids `(...)`."""
        return (digits.long() * self._basis).sum(dim=-1)

    def indices_to_codes(self, ids: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Map int ids `(...)` in `[0, codebook_size)` to float32 codes `(..., dim)`; the inverse of
        `codes_to_indices`. `validate=False` skips the range check (a read back to the host)."""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"`ids` must be an integer tensor; got "
                            f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype}")
        if validate and ids.numel() and ids.device.type != "meta":
            low, high = (v.item() for v in torch.aminmax(ids))
            if low < 0 or high >= self.codebook_size:
                raise ValueError(f"`ids` must lie in [0, {self.codebook_size}) (the FSQ codebook size); got min "
                                 f"{low}, max {high}")
        digits = (ids.long().unsqueeze(-1) // self._basis) % self._levels
        half = self._half_width()
        return (digits.float() - half) / half

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"
