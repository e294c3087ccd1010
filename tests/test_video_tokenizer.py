import math

import numpy as np
import pytest
import torch

from accelerate.utils import convert_outputs_to_fp32

from modeling_nbp.video_tokenizer import (FrameConv3d, NBPVideoTokenizer, NBPVideoTokenizerOutput, ResidualUnit,
                                          depth_to_space, space_to_depth)

# Tiny configurations: (time, space) compression (2, 2), (4, 8) with the official stride pattern, and (4, 8)
# from a 2x space-to-depth stem plus two conv downsamplings.
TINY = dict(block_out_channels=(8, 16), layers_per_block=(1, 1), downsample_strides=((2, 2),),
            fsq_levels=(8, 5, 5, 5), norm_num_groups=4)
OFFICIAL_PATTERN = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=(1, 1, 1, 2),
                        downsample_strides=((1, 2), (2, 2), (2, 2)), fsq_levels=(8, 8, 8), norm_num_groups=4)
PATCHED = dict(block_out_channels=(8, 16, 16), layers_per_block=(1, 1, 1), downsample_strides=((2, 2), (2, 2)),
               fsq_levels=(8, 5, 5, 5), norm_num_groups=4, patch_size=2)


def make(config, seed=0):
    torch.manual_seed(seed)
    return NBPVideoTokenizer(**config).eval()


def rand_video(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- official structure
def _official_layer_table():
    """Hand-written from the official nbp/magvit2.py: (index, kind, in_channels, out_channels)."""
    res = lambda c_in, c_out: ("res", c_in, c_out)  # noqa: E731
    encoder = [("conv3", 3, 128), *[res(128, 128)] * 4, ("conv3", 128, 128), res(128, 256), *[res(256, 256)] * 3,
               ("conv3", 256, 256), *[res(256, 256)] * 4, ("conv3", 256, 256), res(256, 512),
               *[res(512, 512)] * 7, ("norm", 512, 512), ("swish", 512, 512), ("plain1", 512, 6)]
    decoder = [("conv3", 6, 512), *[res(512, 512)] * 8, ("conv3", 512, 4096), ("d2s", 0, 0), res(512, 256),
               *[res(256, 256)] * 3, ("conv3", 256, 2048), ("d2s", 0, 0), *[res(256, 256)] * 4,
               ("conv3", 256, 1024), ("d2s", 0, 0), res(256, 128), *[res(128, 128)] * 3, ("norm", 128, 128),
               ("swish", 128, 128), ("conv3", 128, 3)]
    return {"encoder_layers": encoder, "decoder_layers": decoder}


def _expected_official_shapes():
    def conv(prefix, c_in, c_out, k):
        return {f"{prefix}.weight": (c_out, c_in, k, k, k), f"{prefix}.bias": (c_out,)}

    shapes = {}
    for stack, layers in _official_layer_table().items():
        for i, (kind, c_in, c_out) in enumerate(layers):
            p = f"{stack}.{i}"
            if kind == "conv3":
                shapes.update(conv(f"{p}.conv", c_in, c_out, 3))
            elif kind == "plain1":
                shapes.update(conv(p, c_in, c_out, 1))
            elif kind == "norm":
                shapes.update({f"{p}.weight": (c_in,), f"{p}.bias": (c_in,)})
            elif kind == "swish":
                shapes[f"{p}.beta"] = (1, c_in, 1, 1, 1)
            elif kind == "res":
                shapes.update({f"{p}.fn.0.weight": (c_in,), f"{p}.fn.0.bias": (c_in,),
                               f"{p}.fn.1.beta": (1, c_in, 1, 1, 1),
                               f"{p}.fn.3.weight": (c_out,), f"{p}.fn.3.bias": (c_out,),
                               f"{p}.fn.4.beta": (1, c_out, 1, 1, 1)})
                shapes.update(conv(f"{p}.fn.2.conv", c_in, c_out, 3))
                shapes.update(conv(f"{p}.fn.5.conv", c_out, c_out, 3))
                if c_in != c_out:
                    shapes.update(conv(f"{p}.residual_fn.0.conv", c_in, c_out, 1))
    return shapes


@pytest.fixture(scope="module")
def official_meta():
    with torch.device("meta"):
        return NBPVideoTokenizer()


def test_official_config_matches_checkpoint_keys_and_size(official_meta):
    state = official_meta.state_dict()
    expected = _expected_official_shapes()
    assert len(state) == 434 == len(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # representative keys from the official checkpoint (NBP_REFERENCE.md section 4)
    assert state["encoder_layers.0.conv.weight"].shape == (128, 3, 3, 3, 3)
    assert state["encoder_layers.6.residual_fn.0.conv.weight"].shape == (256, 128, 1, 1, 1)
    assert state["encoder_layers.26.weight"].shape == (6, 512, 1, 1, 1)
    assert state["decoder_layers.0.conv.weight"].shape == (512, 6, 3, 3, 3)
    assert state["decoder_layers.9.conv.weight"].shape == (4096, 512, 3, 3, 3)
    assert state["decoder_layers.15.conv.weight"].shape == (2048, 256, 3, 3, 3)
    assert state["decoder_layers.21.conv.weight"].shape == (1024, 256, 3, 3, 3)
    assert state["decoder_layers.23.residual_fn.0.conv.weight"].shape == (128, 256, 1, 1, 1)
    assert state["decoder_layers.28.beta"].shape == (1, 128, 1, 1, 1)
    assert state["decoder_layers.29.conv.weight"].shape == (3, 128, 3, 3, 3)
    n_params = sum(p.numel() for p in official_meta.parameters())
    assert n_params == sum(math.prod(s) for s in expected.values()) == 370_372_105  # the paper's 370.37M


def test_official_config_geometry(official_meta):
    tok = official_meta
    assert (tok.temporal_compression, tok.spatial_compression, tok.codebook_size) == (4, 8, 64000)
    assert tok.latent_shape(17, 128, 128) == (5, 16, 16)
    assert tok.num_frames_for_latent(5) == 17
    shape = tok.latent_shape(np.int64(17), np.int32(128), np.int64(128))  # sizes read from arrays (were refused)
    assert shape == (5, 16, 16) and all(type(n) is int for n in shape)
    assert tok.num_frames_for_latent(np.int64(5)) == 17
    ids = tok.encode(torch.empty(1, 3, 17, 128, 128, device="meta"))
    assert ids.shape == (1, 5, 16, 16) and ids.dtype == torch.int64
    assert tok.decode(ids).shape == (1, 3, 17, 128, 128)


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("config, frames, size, latent", [
    (TINY, 5, 8, (3, 4, 4)),
    (OFFICIAL_PATTERN, 9, 16, (3, 2, 2)),
    (PATCHED, 5, 16, (2, 2, 2)),
])
def test_encode_decode_shapes(config, frames, size, latent):
    tok = make(config)
    video = rand_video(2, 3, frames, size, size)
    assert tok.latent_shape(frames, size, size) == latent
    assert tok.num_frames_for_latent(latent[0]) == frames
    ids = tok.encode(video)
    assert ids.shape == (2, *latent) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < tok.codebook_size
    decoded = tok.decode(ids)
    assert decoded.shape == video.shape and decoded.min() >= 0 and decoded.max() <= 1
    out = tok(video)
    assert out.reconstruction.shape == video.shape and torch.equal(out.ids, ids)
    codes, ids_again = tok.quantize(tok._encode_latents(video))
    assert torch.equal(ids_again, ids) and torch.equal(tok.indices_to_codes(ids), codes)


def test_depth_to_space_layout_by_hand():
    # channel (dh * 2 + dw) goes to pixel (dh, dw)
    x = torch.arange(4.0).reshape(1, 4, 1, 1, 1)
    assert depth_to_space(x, 1, 2).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    # time: channel dt goes to frame dt
    x = torch.tensor([10.0, 11.0]).reshape(1, 2, 1, 1, 1)
    assert depth_to_space(x, 2, 1).flatten().tolist() == [10.0, 11.0]
    # two output channels: the offset is the slow index, the channel the fast one ((dh * 2 + dw) * C + c)
    x = torch.arange(8.0).reshape(1, 8, 1, 1, 1)
    assert depth_to_space(x, 1, 2)[0, :, 0].tolist() == [[[0.0, 2.0], [4.0, 6.0]], [[1.0, 3.0], [5.0, 7.0]]]
    video = rand_video(2, 3, 3, 4, 6)
    assert torch.equal(depth_to_space(space_to_depth(video, 2), 1, 2), video)


# -------------------------------------------------------------------------------------- causality
def test_encoder_is_causal_in_time():
    tok = make(OFFICIAL_PATTERN)
    video = rand_video(1, 3, 13, 16, 16)
    ids = tok.encode(video)
    latents = tok._encode_latents(video)
    for k in range(3):  # latent frame k sees pixel frames 0..4k only
        changed = video.clone()
        changed[:, :, 4 * k + 1:] = rand_video(1, 3, 12 - 4 * k, 16, 16, seed=k + 1)
        assert torch.equal(tok.encode(changed)[:, :k + 1], ids[:, :k + 1])
        assert not torch.allclose(tok._encode_latents(changed)[:, :, k + 1], latents[:, :, k + 1])


def test_decoder_is_causal_in_time():
    tok = make(OFFICIAL_PATTERN)
    ids = torch.randint(0, tok.codebook_size, (1, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    video = tok.decode(ids)
    for j in range(4):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 97) % tok.codebook_size
        new = tok.decode(changed)
        # latent frame j (j >= 1) decodes to pixel frames 4j-3 .. 4j; latent frame 0 to pixel frame 0
        first = 0 if j == 0 else 4 * j - 3
        assert torch.equal(new[:, :, :first], video[:, :, :first])
        assert not torch.allclose(new[:, :, first], video[:, :, first])


def test_prefix_decoding_matches_full_decoding():
    tok = make(OFFICIAL_PATTERN)
    ids = torch.randint(0, tok.codebook_size, (2, 4, 2, 2), generator=torch.Generator().manual_seed(1))
    full = tok.decode(ids)
    for k in (1, 2, 3):
        prefix = tok.decode(ids[:, :k])
        assert prefix.shape[2] == tok.num_frames_for_latent(k)
        torch.testing.assert_close(prefix, full[:, :, :prefix.shape[2]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [OFFICIAL_PATTERN, PATCHED], ids=["official-pattern", "patched"])
@pytest.mark.parametrize("splits", [(1, 1, 1, 1, 1), (2, 3), (1, 4), (3, 1, 1)])
def test_incremental_decoding_matches_full_decoding(config, splits):
    tok = make(config)
    ids = torch.randint(0, tok.codebook_size, (3, 5, 2, 2), generator=torch.Generator().manual_seed(2))
    full = tok.decode(ids)
    decoder = tok.incremental_decoder(decode_batch_size=2)
    chunks, start = [], 0
    for k in splits:
        chunks.append(decoder(ids[:, start:start + k]))
        expected = tok.num_frames_for_latent(k) if start == 0 else tok.temporal_compression * k
        assert chunks[-1].shape[2] == expected
        start += k
    torch.testing.assert_close(torch.cat(chunks, dim=2), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds a batch of 3 videos"):
        decoder(ids[:1, :1])


@pytest.mark.parametrize("kernel,stride", [(3, (1, 1, 1)), (3, (1, 2, 2)), (3, (2, 2, 2)), (1, (1, 1, 1))])
def test_a_convolution_over_stacked_frames_is_the_3d_convolution(kernel, stride):
    conv = FrameConv3d(6, 5, kernel, stride=stride)
    x = torch.randn(2, 6, 7, 8, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
    outputs, grads = [], []
    for as_frames in (False, True):
        conv.as_frames = as_frames
        y = conv(x)
        y.square().sum().backward()
        outputs.append(y)
        grads.append(torch.cat([x.grad.flatten(), conv.weight.grad.flatten(), conv.bias.grad.flatten()]))
        x.grad = conv.weight.grad = conv.bias.grad = None
    assert outputs[1].shape == outputs[0].shape
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="FrameConv3d takes no padding, dilation or groups"):
        FrameConv3d(6, 5, 3, padding=1)


@pytest.mark.parametrize("config", [OFFICIAL_PATTERN, PATCHED], ids=["official-pattern", "patched"])
def test_tokenizer_with_2d_convolutions_over_stacked_frames(config):
    tok = make(config)
    video = rand_video(2, 3, 9, 16, 16)
    ids = torch.randint(0, tok.codebook_size, (2, 3, 2, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        latents, decoded = tok._encode_latents(video), tok.decode(ids)
        tok.conv_implementation = "frames2d"
        assert all(m.as_frames for m in tok.modules() if isinstance(m, FrameConv3d))
        torch.testing.assert_close(tok._encode_latents(video), latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tok.decode(ids), decoded, atol=1e-5, rtol=1e-5)
        decoder = tok.incremental_decoder()
        frames = torch.cat([decoder(ids[:, :1]), decoder(ids[:, 1:])], dim=2)
        torch.testing.assert_close(frames, decoded, atol=1e-5, rtol=1e-5)
    tok.conv_implementation = "conv3d"
    assert not any(m.as_frames for m in tok.modules() if isinstance(m, FrameConv3d))
    with pytest.raises(ValueError, match=r"conv_implementation must be one of \('conv3d', 'frames2d'\), got 'conv2d'"):
        tok.conv_implementation = "conv2d"


def test_prefix_encoding_matches_full_encoding():
    tok = make(OFFICIAL_PATTERN)
    video = rand_video(1, 3, 13, 16, 16)
    full = tok._encode_latents(video)
    torch.testing.assert_close(tok._encode_latents(video[:, :, :5]), full[:, :, :2], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- training
def _blob_clips(n, frames, size, seed=0):
    """Coloured Gaussian blobs moving in straight lines on a dark background."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.arange(size).float()
    clips = torch.empty(n, 3, frames, size, size)
    for i in range(n):
        color = torch.rand(3, generator=g)
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        vy, vx = (torch.rand(2, generator=g) * 2 - 1).tolist()
        for t in range(frames):
            d2 = (grid[:, None] - cy - vy * t) ** 2 + (grid[None, :] - cx - vx * t) ** 2
            clips[i, :, t] = 0.1 + 0.8 * color[:, None, None] * torch.exp(-d2 / (2 * (size / 5) ** 2))
    return clips


def _psnr(a, b):
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()


def test_tiny_tokenizer_overfits_a_few_clips():
    config = dict(block_out_channels=(16, 32), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                  fsq_levels=(8, 5, 5, 5), norm_num_groups=4, patch_size=2)
    tok = make(config).train()
    clips = _blob_clips(4, 5, 16)
    with torch.no_grad():
        untrained = _psnr(tok.decode(tok.encode(clips)), clips)
    constant = _psnr(clips.mean(dim=(0, 2, 3, 4), keepdim=True).expand_as(clips), clips)
    optimizer = torch.optim.Adam(tok.parameters(), lr=3e-3)
    for _ in range(80):
        loss = ((tok(clips).reconstruction - clips) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        trained = _psnr(tok.decode(tok.encode(clips)), clips)
    assert trained > untrained + 6 and trained > constant + 4, (untrained, constant, trained)


def test_straight_through_gradients_reach_the_encoder():
    tok = make(TINY).train()
    video = rand_video(1, 3, 5, 8, 8)
    tok(video).reconstruction.mean().backward()
    assert tok.encoder_layers[0].conv.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    video = rand_video(1, 3, 5, 8, 8)
    grads, unit_calls = [], []
    for checkpointing in (False, True):
        tok = make(TINY).train()
        if checkpointing:
            tok.enable_gradient_checkpointing()
        calls = []
        for module in tok.modules():
            if isinstance(module, ResidualUnit):
                module.register_forward_pre_hook(lambda *args: calls.append(1))
        tok(video).reconstruction.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tok.parameters()]))
        unit_calls.append(len(calls))
    torch.testing.assert_close(grads[0], grads[1])
    # checkpointed residual units start their forward again during the backward pass (the recomputation stops
    # early once it has what the backward needs, so only pre-hooks are sure to see it)
    assert unit_calls[0] == 4 and unit_calls[1] == 8


# ------------------------------------------------------------------------------- saving, dtypes, batching
def test_save_and_load_round_trip(tmp_path):
    tok = make(PATCHED)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = NBPVideoTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.spatial_compression == tok.spatial_compression == 8
    video = rand_video(2, 3, 5, 16, 16)
    ids = tok.encode(video)
    assert torch.equal(loaded.encode(video), ids)
    assert torch.equal(loaded.decode(ids), tok.decode(ids))


def test_inputs_within_rounding_of_the_pixel_range_are_accepted():
    tok = make(TINY)
    video = rand_video(1, 3, 5, 8, 8)
    video[0, 0, 0, 0, :2] = torch.tensor([-5e-4, 1 + 5e-4])
    assert tok.encode(video).shape == (1, 3, 4, 4)
    assert tok.encode(video.bfloat16()).shape == (1, 3, 4, 4)


def test_bfloat16_encode_and_decode():
    tok = make(TINY).to(torch.bfloat16)
    video = rand_video(2, 3, 5, 8, 8)  # float32 input is cast to the module dtype
    ids = tok.encode(video)
    assert ids.dtype == torch.int64 and ids.shape == (2, 3, 4, 4) and ids.max() < tok.codebook_size
    decoded = tok.decode(ids)
    assert decoded.dtype == torch.bfloat16 and decoded.shape == video.shape
    assert torch.isfinite(decoded).all() and decoded.min() >= 0 and decoded.max() <= 1


def test_forward_output_survives_accelerate_mixed_precision():
    # what `Accelerator.prepare` wraps the forward with under fp16/bf16: it rebuilds the output as type(out)(dict)
    tok = make(TINY).to(torch.bfloat16)
    video = rand_video(1, 3, 5, 8, 8)
    expected = tok(video)
    out = convert_outputs_to_fp32(tok.forward)(video)
    assert isinstance(out, NBPVideoTokenizerOutput)
    assert out.reconstruction.dtype == torch.float32 and out.ids.dtype == torch.int64
    torch.testing.assert_close(out.reconstruction, expected.reconstruction.float())
    assert torch.equal(out.ids, expected.ids)


def test_non_finite_latents_raise_instead_of_giving_bad_ids():
    tok = make(TINY).to(torch.float16)
    with torch.no_grad():
        tok.encoder_layers[0].conv.weight.mul_(6e4)  # stands in for activations that overflow float16
    with pytest.raises(FloatingPointError, match=r"NaN or infinite latent values \(weights in torch.float16; "
                                                  r"float16 overflows .* bfloat16 or float32"):
        tok.encode(rand_video(1, 3, 5, 8, 8))


def test_nan_pixels_raise_instead_of_giving_black_frames():
    tok = make(TINY).to(torch.float16)
    ids = torch.randint(0, tok.codebook_size, (2, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tok.decoder_layers[0].conv.weight.mul_(6e4)  # stands in for activations that overflow float16
    message = r"decoded NaN pixels from .* \(weights in torch.float16; float16 overflows .* bfloat16 or float32"
    for decode in (tok.decode, lambda ids: tok.decode(ids, decode_batch_size=1), tok.incremental_decoder()):
        with pytest.raises(FloatingPointError, match=message):
            decode(ids)
    assert tok.incremental_decoder()(ids, validate=False).isnan().any()  # unchecked: NaN kept for the caller to see


def test_non_finite_latents_give_no_ids_in_training_and_quantize():
    tok = make(TINY)
    with pytest.raises(FloatingPointError, match="`z` holds NaN or infinite values"):
        tok.quantize(torch.full((1, 4, 1, 1, 1), float("nan")))
    with torch.no_grad():
        tok.encoder_layers[0].conv.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="`z` holds NaN or infinite values"):
        tok(rand_video(1, 3, 5, 8, 8))


def test_decode_in_chunks_matches_one_pass():
    tok = make(TINY)
    ids = torch.randint(0, tok.codebook_size, (5, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    whole = tok.decode(ids)
    for size in (2, np.int64(2)):  # numpy integers too, as the pipeline passes them on
        torch.testing.assert_close(tok.decode(ids, decode_batch_size=size), whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tok.incremental_decoder(size)(ids), whole, atol=1e-5, rtol=1e-5)
    for bad in (0, 2.0, True, np.float64(2)):
        with pytest.raises(ValueError, match=r"`decode_batch_size` must be a positive integer or None; got"):
            tok.decode(ids, decode_batch_size=bad)
        with pytest.raises(ValueError, match=r"`decode_batch_size` must be a positive integer or None; got"):
            tok.incremental_decoder(bad)


def test_decode_splits_the_batch_when_memory_runs_out(monkeypatch, caplog):
    tok = make(TINY)
    ids = torch.randint(0, tok.codebook_size, (5, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    expected = tok.decode(ids)
    decode_codes, sizes = tok._decode_codes, []

    def fits_two(codes):  # a GPU that holds two videos' activations at a time
        sizes.append(codes.shape[0])
        if codes.shape[0] > 2:
            raise torch.OutOfMemoryError("out of memory")
        return decode_codes(codes)

    monkeypatch.setattr(tok, "_decode_codes", fits_two)
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(tok.decode(ids), expected, atol=1e-5, rtol=1e-5)  # batches round differently
    assert sizes == [5, 3, 2, 2, 1]  # 5 fails, 3 fails, then halves of 2
    assert "retrying with decode_batch_size=3" in caplog.text and "decode_batch_size=2" in caplog.text
    monkeypatch.setattr(tok, "_decode_codes", lambda codes: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError):  # a single video that does not fit is not hidden
        tok.decode(ids[:1])


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("video, error, message", [
    (rand_video(1, 3, 6, 16, 16), ValueError,
     r"`video` frame count \(dim 2\) must be 1 \+ 4 \* n \(one of 1, 5, 9, 13, 17"),
    (rand_video(1, 3, 5, 12, 16), ValueError,
     r"`video` height \(dim 3\) must be a multiple of the spatial compression 8"),
    (rand_video(1, 3, 5, 16, 20), ValueError, r"`video` width \(dim 4\) must be a multiple"),
    (rand_video(1, 1, 5, 16, 16), ValueError, r"`video` must have 3 channels"),
    (rand_video(1, 5, 16, 16, 3), ValueError,
     r"3 channels in dim 1 .*channels-last .*`video\.permute\(0, 4, 1, 2, 3\)`"),
    (rand_video(1, 5, 3, 16, 16), ValueError, r"3 channels in dim 1 .*`video\.permute\(0, 2, 1, 3, 4\)`"),
    (rand_video(1, 3, 5, 16, 16) * 255, ValueError, r"`video` values must lie in \[0, 1\].*0\.\.255"),
    (rand_video(1, 3, 5, 16, 16) * 2 - 1, ValueError, r"`video` values must lie in \[0, 1\].*\[-1, 1\]"),
    # [-1, 1] pixels whose darkest value is above -0.5
    ((rand_video(1, 3, 5, 16, 16) * 0.6 + 0.4) * 2 - 1, ValueError, r"`video` values must lie in \[0, 1\].*\[-1, 1\]"),
    (rand_video(1, 3, 5, 16, 16) * 1.01, ValueError, r"`video` values must lie in \[0, 1\].*clamp"),
    (torch.empty(1, 3, 5, 16, 16, device="meta"), ValueError, r"`video` is on meta but the model is on cpu"),
    (torch.full((1, 3, 5, 16, 16), float("nan")), ValueError, r"`video` contains NaN"),
    ((rand_video(1, 3, 5, 16, 16) * 255).to(torch.uint8), TypeError, r"`video` must be a floating-point tensor"),
    (rand_video(3, 5, 16, 16), ValueError, r"`video` must have shape \(batch, channels, frames, height, width\)"),
])
def test_bad_video_is_rejected(video, error, message):
    tok = make(OFFICIAL_PATTERN)
    with pytest.raises(error, match=message):
        tok.encode(video)
    with pytest.raises(error, match=message):
        tok(video)


def test_forward_encode_and_decode_compile_as_one_graph_and_still_check_their_inputs():
    """Inside torch.compile the checks read nothing back to the host (device-side asserts with the same messages),
    so `torch.compile(tok.decode)` and the others trace as one graph and give the eager results."""
    tok = make(OFFICIAL_PATTERN)
    video = rand_video(1, 3, 5, 16, 16)
    ids = tok.encode(video)
    # backend="eager": dynamo's tracing without inductor's compile time; fullgraph: a graph break is an error
    forward, encode, decode = (torch.compile(f, fullgraph=True, backend="eager") for f in (tok, tok.encode, tok.decode))
    assert torch.equal(forward(video).reconstruction, tok(video).reconstruction)
    assert torch.equal(encode(video), ids) and torch.equal(decode(ids), tok.decode(ids))
    for bad in (video * 255, torch.full_like(video, float("nan"))):
        for compiled in (forward, encode):
            with pytest.raises(RuntimeError, match=r"`video` values must lie in \[0, 1\]"):
                compiled(bad)
    with pytest.raises(RuntimeError, match=r"`ids` must lie in \[0, 512\)"):
        decode(ids + tok.codebook_size)
    with torch.no_grad():
        tok.encoder_layers[0].conv.weight.fill_(float("inf"))
    with pytest.raises(RuntimeError, match="the video tokenizer encoded NaN or infinite latents"):
        encode(video)
    with pytest.raises(RuntimeError, match="`z` holds NaN or infinite values"):  # the quantizer's own check
        forward(video)
    with torch.no_grad():
        tok.decoder_layers[0].conv.weight.fill_(float("inf"))
    with pytest.raises(RuntimeError, match="the video tokenizer decoded NaN pixels"):
        decode(ids)
    assert torch.is_grad_enabled()  # a failed check leaves the caller's grad mode as it was


def test_inductor_compiles_the_decoder():
    """Inductor (torch 2.13) asserted on the decoder's replicate padding after depth-to-space; while compiling, the
    padding is built from edge slices (`replicate_pad`), and the compiled decode gives the eager frames. About 25 s of
    compilation on 2 CPU cores. Static shapes: with the shapes that earlier compilations of `decode` in this process
    saw, automatic dynamic shapes reach another inductor failure (a value range error lowering a convolution)."""
    tok = make(OFFICIAL_PATTERN)
    ids = tok.encode(rand_video(1, 3, 5, 16, 16))
    with torch.no_grad():
        compiled = torch.compile(tok.decode, dynamic=False)
        torch.testing.assert_close(compiled(ids), tok.decode(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ids, kwargs, error, message", [
    (torch.full((1, 2, 2, 2), 512), {}, ValueError, r"`ids` must lie in \[0, 512\)"),
    (torch.full((1, 2, 2, 2), -1), {}, ValueError, r"`ids` must lie in \[0, 512\)"),
    (torch.zeros(1, 2, 2, 2), {}, TypeError, r"`ids` must be an integer tensor"),
    (torch.zeros(1, 2, 2, 2, dtype=torch.long, device="meta"), {}, ValueError,
     r"`ids` is on meta but the model is on cpu"),
    (torch.zeros(1, 8, dtype=torch.long), {}, ValueError, r"`ids` must have shape \(batch, latent_frames"),
    (torch.zeros(1, 0, 2, 2, dtype=torch.long), {}, ValueError, r"`ids` must have shape .* every size >= 1"),
    (torch.zeros(1, 2, 0, 2, dtype=torch.long), {}, ValueError, r"`ids` must have shape .* every size >= 1"),
    (torch.zeros(1, 2, 2, 2, dtype=torch.long), {"decode_batch_size": 0}, ValueError, r"`decode_batch_size`"),
])
def test_bad_ids_are_rejected(ids, kwargs, error, message):
    tok = make(OFFICIAL_PATTERN)
    with pytest.raises(error, match=message):
        tok.decode(ids, **kwargs)


def test_incremental_decoder_checks_each_chunk():
    tok = make(TINY)
    ids = torch.randint(0, tok.codebook_size, (1, 3, 2, 2), generator=torch.Generator().manual_seed(3))
    decoder = tok.incremental_decoder()
    with pytest.raises(ValueError, match=r"`ids` must have shape .* every size >= 1"):
        decoder(ids[:, :0])
    with pytest.raises(ValueError, match=r"first chunk of `ids` needs at least one latent frame"):
        decoder(ids[:, :0], validate=False)
    chunks = [decoder(ids[:, :1])]
    with pytest.raises(ValueError, match=r"holds videos with a 2x2 latent grid"):
        decoder(torch.zeros(1, 1, 3, 3, dtype=torch.long))
    for validate in (True, False):  # an empty chunk mid-stream adds no frames
        empty = decoder(ids[:, 1:1], validate=validate)
        assert empty.shape == (1, 3, 0, 4, 4) and empty.dtype == chunks[0].dtype
    chunks.append(decoder(ids[:, 1:]))
    torch.testing.assert_close(torch.cat(chunks, dim=2), tok.decode(ids), atol=1e-5, rtol=1e-5)


def test_bad_sizes_and_configs_are_rejected():
    tok = make(OFFICIAL_PATTERN)
    with pytest.raises(ValueError, match=r"`num_frames` must be 1 \+ 4 \* n"):
        tok.latent_shape(16, 64, 64)
    with pytest.raises(ValueError, match=r"`z` must have shape \(batch, 3, latent_frames"):
        tok.quantize(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match=r"`latent_frames` must be a positive integer"):
        tok.num_frames_for_latent(0)
    with pytest.raises(ValueError, match=r"`norm_num_groups` \(32\) must divide"):
        NBPVideoTokenizer(block_out_channels=(48, 64), layers_per_block=(1, 1), downsample_strides=((2, 2),))
    with pytest.raises(ValueError, match=r"`downsample_strides` must hold"):
        NBPVideoTokenizer(block_out_channels=(32, 64), layers_per_block=(1, 1), downsample_strides=((3, 2),))
    with pytest.raises(ValueError, match=r"`layers_per_block` needs one entry per level"):
        NBPVideoTokenizer(block_out_channels=(32, 64), layers_per_block=(1,), downsample_strides=((2, 2),))
