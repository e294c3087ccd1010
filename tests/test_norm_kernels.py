"""The tokenizer's Triton norm kernels (`norm_implementation="triton"`): on CUDA, or on CPU under Triton's interpreter
(conftest sets TRITON_INTERPRET=1 there)."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("triton")

from modeling_nbp import norm_kernels  # noqa: E402
from modeling_nbp.video_tokenizer import FrameGroupNorm, NBPVideoTokenizer, Swish  # noqa: E402
from test_pipeline import tiny_pipeline  # noqa: E402
from test_video_tokenizer import OFFICIAL_PATTERN, rand_video  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm weights and biases and Swish betas away from their 1 / 0 / 1 initialisation, so that each one counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrameGroupNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            elif isinstance(m, Swish):
                m.beta.copy_(torch.rand(m.beta.shape, generator=g) + 0.5)
    return module


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of `norm_kernels.group_norm_swish`, so that a test of equal outputs knows the kernels ran."""
    calls = []
    run = norm_kernels.group_norm_swish
    monkeypatch.setattr(norm_kernels, "group_norm_swish", lambda *args: calls.append(args[0]) or run(*args))
    return calls


def make(config, seed=0):
    torch.manual_seed(seed)
    return randomise(NBPVideoTokenizer(**config).eval(), seed).to(DEVICE)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d],
                         ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,padding", [
    ((2, 8, 3, 5, 7), 4, (1, 1, 1, 1, 2, 0)),   # conv padding; odd sizes
    ((1, 6, 1, 33, 35), 2, (1, 1, 1, 1, 2, 0)),  # planes longer than a block (1024), not a multiple of it
    ((1, 16, 2, 4, 4), 16, (0, 0, 0, 0, 0, 0)),  # one channel per group, no padding (the encoder's last conv)
    ((2, 4, 2, 3, 3), 1, (1, 1, 1, 1, 0, 0)),    # one group; padding in space only (the incremental decoder)
])
def test_group_norm_swish_matches_the_modules(dtype, shape, groups, padding, layout):
    norm, act = randomise(FrameGroupNorm(groups, shape[1])), randomise(Swish(shape[1]), seed=1)
    norm, act = norm.to(DEVICE, dtype).float(), act.to(DEVICE, dtype).float()  # parameters exact in dtype
    # an offset far from 0: a one-pass sum of squares in float32 would lose the variance (by a few percent here)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2 + 1000).to(DEVICE, dtype)
    x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        # a float32 reference from a contiguous copy (PyTorch's CPU group norm of a channels-last input loses the
        # variance at this offset: 0.08 off)
        expected = F.pad(act(norm(x.float().contiguous())), padding, mode="replicate")
        weight, bias, beta = (p.to(dtype) for p in (norm.weight, norm.bias, act.beta))
        actual = norm_kernels.group_norm_swish(x, groups, weight, bias, norm.eps, beta, padding)
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=layout)  # the input's layout (a one-channel tensor is both)
    # float32: the input's own resolution at 1000 (6e-5), scaled by 1 / std; bfloat16: one rounding of the result
    # (relative 2^-9, to nearest as on a GPU: conftest's `interpret_bfloat16_as_a_gpu`)
    tolerance = 1e-4 if dtype == torch.float32 else 2 ** -8
    assert ((actual.float() - expected).abs() <= tolerance * (1 + expected.abs())).all()


def test_a_width_of_one_with_any_stride():
    # (.., H, 1) with the stride of the size-1 width unlike H's: is_contiguous() holds, the H x W walk must step by H
    norm, act = randomise(FrameGroupNorm(2, 4)), randomise(Swish(4), seed=1)
    x = torch.randn(1, 4, 2, 1, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE).transpose(3, 4)
    assert x.is_contiguous() and x.stride()[3:] == (1, 6)
    with torch.no_grad():
        torch.testing.assert_close(norm_kernels.group_norm_swish(x, 2, norm.weight, norm.bias, norm.eps, act.beta),
                                   act(norm(x.contiguous())), atol=1e-5, rtol=1e-5)


def test_group_norm_swish_inside_a_compiled_function():
    """torch.compile runs the kernels as they are, between graphs."""
    norm, act = randomise(FrameGroupNorm(2, 4)).to(DEVICE), randomise(Swish(4)).to(DEVICE)
    x = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    padding = (1, 1, 1, 1, 2, 0)
    with torch.no_grad():
        compiled = torch.compile(lambda x: norm_kernels.group_norm_swish(x.tanh(), 2, norm.weight, norm.bias, norm.eps,
                                                                         act.beta, padding))
        torch.testing.assert_close(compiled(x), F.pad(act(norm(x.tanh())), padding, mode="replicate"))


def test_group_norm_swish_rejects_padding_it_does_not_make():
    x = torch.zeros(1, 4, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="symmetric in space and at the front in time"):
        norm_kernels.group_norm_swish(x, 2, torch.ones(4), torch.zeros(4), 1e-5, torch.ones(4), (1, 1, 1, 1, 0, 2))


def test_encode_and_decode_match_the_torch_modules(kernel_calls):
    tok = make(OFFICIAL_PATTERN)
    video = rand_video(1, 3, 5, 16, 16).to(DEVICE)
    ids = tok.encode(video)
    with torch.no_grad():
        latents, pixels = tok._encode_latents(video), tok.decode(ids)
    norms = sum(isinstance(m, FrameGroupNorm) for m in tok.modules())
    assert not kernel_calls
    tok.norm_implementation = "triton"
    with torch.no_grad():
        torch.testing.assert_close(tok._encode_latents(video), latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tok.decode(ids), pixels, atol=1e-5, rtol=1e-5)
    assert torch.equal(tok.encode(video), ids)
    assert len(kernel_calls) == norms + sum(isinstance(m, FrameGroupNorm) for m in tok.encoder_layers.modules())


def test_incremental_decoding_with_the_kernels_matches_full_decoding(kernel_calls):
    tok = make(OFFICIAL_PATTERN)
    ids = torch.randint(0, tok.codebook_size, (1, 4, 2, 2), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        full = tok.decode(ids)
    decoder, chunks = tok.incremental_decoder(), []
    # the frames kept between chunks are the same for both implementations: switching between chunks is fine
    for (a, b), implementation in zip(((0, 2), (2, 3), (3, 4)), ("triton", "torch", "triton")):
        tok.norm_implementation = implementation
        chunks.append(decoder(ids[:, a:b]))
    torch.testing.assert_close(torch.cat(chunks, dim=2), full, atol=1e-5, rtol=1e-5)
    assert len(kernel_calls) == 2 * sum(isinstance(m, FrameGroupNorm) for m in tok.decoder_layers.modules())


def test_a_channels_last_tokenizer_decodes_the_same(kernel_calls):
    """With the weights channels-last (`tok.to(memory_format=torch.channels_last_3d)`) the video is the one the
    contiguous modules give. On CUDA the convolutions then give channels-last activations, which the kernels keep
    (CPU convolutions give contiguous ones: there the layouts are covered by the test of the kernels above)."""
    tok = make(OFFICIAL_PATTERN)
    ids = torch.randint(0, tok.codebook_size, (1, 3, 2, 2), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        expected = tok.decode(ids)
        tok = tok.to(memory_format=torch.channels_last_3d)
        tok.norm_implementation = "triton"
        actual = tok.decode(ids)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    if DEVICE == "cuda":  # all but the first norm after each of the three depth-to-space layers
        assert sum(norm_kernels._channels_last(x) for x in kernel_calls) == len(kernel_calls) - 3


def test_convolutions_over_stacked_frames_feed_the_kernels_channels_last(kernel_calls):
    """`conv_implementation="frames2d"` gives channels-last activations (on CPU too: the 2D convolution's output is
    channels-last), which the kernels read as they are."""
    tok = make(OFFICIAL_PATTERN)
    video = rand_video(1, 3, 5, 16, 16).to(DEVICE)
    ids = torch.randint(0, tok.codebook_size, (1, 3, 2, 2), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        latents, expected = tok._encode_latents(video), tok.decode(ids)
        tok.conv_implementation, tok.norm_implementation = "frames2d", "triton"
        torch.testing.assert_close(tok._encode_latents(video), latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tok.decode(ids), expected, atol=1e-5, rtol=1e-5)
    assert sum(norm_kernels._channels_last(x) for x in kernel_calls) > len(kernel_calls) // 2


def test_the_pipeline_gives_the_same_frames_with_the_kernels(kernel_calls):
    """Frame prediction end to end (encode the context, generate, decode; also decoding while generating) with the
    Triton norms gives the frames of PyTorch's."""
    pipe = tiny_pipeline(mode="frames")
    randomise(pipe.video_tokenizer)
    context = np.random.default_rng(1).random((3, 8, 8, 3)).astype(np.float32)
    run = lambda **kw: pipe(video=context, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).frames
    expected = run()
    pipe.video_tokenizer.norm_implementation = "triton"
    torch.testing.assert_close(run(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(overlap_decode=True), expected, atol=1e-5, rtol=0)
    assert kernel_calls


def test_training_keeps_the_torch_modules(kernel_calls):
    """Where gradients are recorded, the kernels (which have no backward) are not used: same loss and gradients."""
    video = rand_video(1, 3, 5, 16, 16).to(DEVICE)
    grads = []
    for implementation in ("torch", "triton"):
        tok = make(OFFICIAL_PATTERN)
        tok.norm_implementation = implementation
        tok.train()
        F.mse_loss(tok(video).reconstruction, video).backward()
        grads.append(torch.cat([p.grad.flatten() for p in tok.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1]) and not kernel_calls


def test_norm_implementation_is_checked(monkeypatch):
    tok = make(OFFICIAL_PATTERN)
    with pytest.raises(ValueError, match=r"norm_implementation must be one of \('torch', 'triton'\)"):
        tok.norm_implementation = "apex"
    assert tok.norm_implementation == "torch"
    if DEVICE == "cpu":
        tok.norm_implementation = "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        video = rand_video(1, 3, 5, 16, 16)
        with pytest.raises(ValueError, match="norm_implementation='triton' runs on a CUDA device"):
            tok.encode(video)
        with pytest.raises(ValueError, match="norm_implementation='triton' runs on a CUDA device"):
            tok.incremental_decoder()(torch.zeros(1, 1, 2, 2, dtype=torch.long))
