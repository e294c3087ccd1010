import math

import pytest
import torch

from modeling_nbp.fsq import FSQ, round_straight_through

OFFICIAL_LEVELS = (8, 8, 8, 5, 5, 5)


@pytest.mark.parametrize("levels", [(3, 4, 5), (8, 5, 5, 5)])
def test_every_index_round_trips_through_its_code(levels):
    fsq = FSQ(levels)
    ids = torch.arange(math.prod(levels))
    codes = fsq.indices_to_codes(ids)
    assert codes.shape == (len(ids), len(levels))
    assert torch.equal(fsq.codes_to_indices(codes), ids)
    # distinct ids give distinct codes, and every code is on the grid k / (L // 2) with digit k + L // 2 in [0, L)
    assert len(torch.unique(codes, dim=0)) == len(ids)
    half = torch.tensor(levels) // 2
    digits = codes * half + half
    assert torch.equal(digits, digits.round())
    assert digits.min() >= 0 and (digits < torch.tensor(levels)).all()


def test_known_indices_for_official_levels():
    # basis = [1, 8, 64, 512, 2560, 12800], half = [4, 4, 4, 2, 2, 2], digit_i = code_i * half_i + half_i
    fsq = FSQ(OFFICIAL_LEVELS)
    codes = torch.tensor([
        [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0],  # digits 0: index 0
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # digits [4,4,4,2,2,2]: 4 + 32 + 256 + 1024 + 5120 + 25600 = 32036
        [0.75, 0.75, 0.75, 1.0, 1.0, 1.0],  # digits [7,7,7,4,4,4]: 7 + 56 + 448 + 2048 + 10240 + 51200 = 63999
        [0.75, -1.0, 0.25, 0.5, -0.5, 1.0],  # digits [7,0,5,3,1,4]: 7 + 0 + 320 + 1536 + 2560 + 51200 = 55623
    ])
    expected = torch.tensor([0, 32036, 63999, 55623])
    assert fsq.codebook_size == 64000
    assert torch.equal(fsq.codes_to_indices(codes), expected)
    assert torch.equal(fsq.indices_to_codes(expected), codes)


def test_quantize_lands_on_grid_and_matches_ids():
    fsq = FSQ(OFFICIAL_LEVELS)
    z = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(0)) * 3
    codes, ids = fsq(z)
    assert codes.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (2, 7)
    half = torch.tensor([4.0, 4, 4, 2, 2, 2])
    assert torch.equal(codes * half, (codes * half).round())
    assert (codes >= -1).all() and (codes <= 1).all()
    assert torch.equal(ids, fsq.codes_to_indices(codes))
    assert torch.equal(fsq.indices_to_codes(ids), codes)


def test_zero_and_saturated_latents():
    fsq = FSQ(OFFICIAL_LEVELS)
    codes, ids = fsq(torch.tensor([[0.0] * 6, [50.0] * 6, [-50.0] * 6]))
    # the tan shift makes z = 0 land on code 0 for even levels too; large |z| saturate at the outer levels
    assert torch.equal(codes[0], torch.zeros(6))
    assert ids.tolist() == [32036, 63999, 0]


def test_bound_formula_by_hand():
    fsq = FSQ((5, 8))
    z = torch.tensor([[0.3, 0.3]])
    half_5, half_8 = 4 * 0.999 / 2, 7 * 0.999 / 2
    expected = [math.tanh(0.3) * half_5, math.tanh(0.3 + math.tan(0.5 / half_8)) * half_8 - 0.5]
    assert torch.allclose(fsq.bound(z), torch.tensor([expected]), atol=1e-6)


def test_straight_through_gradient():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    round_straight_through(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))

    # through the quantizer, the rounding contributes a factor of exactly 1: d codes / dz = bound'(z) / half
    fsq = FSQ((8, 5))
    z = torch.tensor([[0.3, -0.7], [1.1, 0.2]], requires_grad=True)
    fsq(z)[0].sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (fsq.bound(z_ref) / torch.tensor([4.0, 2.0])).sum().backward()
    assert torch.allclose(z.grad, z_ref.grad)


def test_low_precision_input_is_quantized_in_float32():
    fsq = FSQ((8, 5, 5, 5)).to(torch.bfloat16)
    assert fsq._levels.dtype == torch.int64  # `.to(dtype)` must not touch the integer constants
    codes, ids = fsq(torch.randn(3, 4).bfloat16())
    assert codes.dtype == torch.float32
    assert torch.equal(fsq.indices_to_codes(ids), codes)


def test_no_parameters_and_empty_state_dict():
    fsq = FSQ(OFFICIAL_LEVELS)
    assert list(fsq.parameters()) == [] and len(fsq.state_dict()) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="`levels`"):
        FSQ((8, 1))
    fsq = FSQ((8, 5))
    with pytest.raises(ValueError, match="`z` must have 2 channels"):
        fsq(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="`z` must be a floating-point tensor"):
        fsq(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="`ids` must be an integer tensor"):
        fsq.indices_to_codes(torch.zeros(3))
    for bad in (-1, 40):  # would wrap around to the last / first code
        with pytest.raises(ValueError, match=r"`ids` must lie in \[0, 40\).*got min"):
            fsq.indices_to_codes(torch.tensor([0, bad, 39]))


def test_odd_levels_reach_plus_one():
    codes = FSQ((5, 4)).indices_to_codes(torch.arange(20))
    assert codes[:, 0].max() == 1 and codes[:, 1].max() == 0.5 and codes.min() == -1


def test_non_finite_latents_and_codes_off_the_grid_are_refused():
    # NaN would round to INT64_MIN, a code past the grid to an id of another code or past the codebook
    fsq = FSQ((8, 5, 5, 5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(FloatingPointError, match=r"`z` holds NaN or infinite values \(dtype torch.float32\)"):
            fsq(torch.tensor([[0.0, bad, 0.0, 0.0]]))
    off_grid = ([1.0, 0, 0, 0],  # level 8 stops at 0.75
                [1.0, 1, 1, 1], [-1.25, 0, 0, 0], [0, 1.5, 0, 0], [float("nan"), 0, 0, 0])
    for codes in off_grid:
        with pytest.raises(ValueError, match=r"`codes` must lie on the FSQ grid of levels \(8, 5, 5, 5\)"):
            fsq.codes_to_indices(torch.tensor([codes]))
    assert fsq.codes_to_indices(torch.tensor([[0.75, 1, 1, 1], [-1.0, -1, -1, -1]])).tolist() == [999, 0]


def test_checks_compile_into_one_graph():
    fsq = FSQ((8, 5))
    forward, to_indices = (torch.compile(f, fullgraph=True, backend="eager") for f in (fsq, fsq.codes_to_indices))
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    codes, ids = fsq(z)
    assert torch.equal(forward(z)[1], ids) and torch.equal(to_indices(codes), ids)
    with pytest.raises(RuntimeError, match="`z` holds NaN or infinite values"):
        forward(torch.full((6, 2), float("nan")))
    with pytest.raises(RuntimeError, match="`codes` must lie on the FSQ grid"):
        to_indices(codes + 1)
