"""NBPVideoPipeline tests in the spirit of diffusers' PipelineTesterMixin, with tiny dummy components."""


from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from hub_server import set_hub_offline
from remote_code import run_without_package
from modeling_nbp import NBPConfig, NBPForVideoGeneration, NBPVideoPipeline, NBPVideoTokenizer
from modeling_nbp.pipelines.pipeline_nbp_video import _relative_imports, preprocess_video
from modeling_nbp.video_io import as_uint8_frames, make_contact_sheet, read_video

CLASSES = {0: "circle", 1: "square", 2: "TriangleUp"}


def tiny_tokenizer():
    torch.manual_seed(0)
    return NBPVideoTokenizer(block_out_channels=(8, 16), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                             fsq_levels=(5, 5, 5), norm_num_groups=4).eval()


def tiny_pipeline(mode="class", block=(1, 1, 4), latent_shape=(3, 4, 4), **config):
    tok = tiny_tokenizer()  # 2x time, 2x space: 5 frames of 8x8 <-> 3 x 4 x 4 tokens
    kw = dict(num_classes=3, id2label=CLASSES, first_block="hybrid") if mode == "class" else \
        dict(first_block="none", num_context_frames=1) if mode == "frames" else dict(first_block="hybrid")
    cfg = NBPConfig(latent_shape=list(latent_shape), block_shape=list(block), video_vocab_size=tok.codebook_size,
                    condition_mode=mode, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **{**kw, **config})
    torch.manual_seed(1)
    pipe = NBPVideoPipeline(transformer=NBPForVideoGeneration(cfg).eval(), video_tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def frames_pipe():
    return tiny_pipeline(mode="frames")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_output_types(pipe):
    kw = dict(class_labels=[0, 1], generator=gen(0))
    pil = pipe(**kw).frames
    assert len(pil) == 2 and len(pil[0]) == 5 and isinstance(pil[0][0], PIL.Image.Image) and pil[0][0].size == (8, 8)
    arr = pipe(output_type="np", **dict(kw, generator=gen(0))).frames
    assert arr.shape == (2, 5, 8, 8, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    pt = pipe(output_type="pt", **dict(kw, generator=gen(0))).frames
    assert pt.shape == (2, 5, 3, 8, 8)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), arr)
    np.testing.assert_array_equal(np.asarray(pil[1][2]), (arr[1, 2] * 255).round().astype(np.uint8))
    latent = pipe(output_type="latent", **dict(kw, generator=gen(0))).frames
    assert latent.shape == (2, 3, 4, 4) and latent.dtype == torch.long
    np.testing.assert_allclose(postdecode(pipe, latent), arr, atol=1e-6)
    (tup,) = pipe(return_dict=False, output_type="np", **dict(kw, generator=gen(0)))
    np.testing.assert_array_equal(tup, arr)


def test_pt_frames_export_as_the_np_frames(pipe):
    # the exporters read a video of the "pt" output, (T, 3, H, W), as the same video of the "np" output
    pt = pipe(class_labels=[0, 1], generator=gen(0), output_type="pt").frames
    arr = pipe(class_labels=[0, 1], generator=gen(0), output_type="np").frames
    np.testing.assert_array_equal(as_uint8_frames(pt[1]), as_uint8_frames(arr[1]))
    np.testing.assert_array_equal(np.asarray(make_contact_sheet(pt)), np.asarray(make_contact_sheet(arr)))


@torch.no_grad()
def postdecode(pipe, latent):
    return pipe.video_tokenizer.decode(latent).permute(0, 2, 3, 4, 1).numpy()


def test_seeds(pipe):
    a = pipe(class_labels=[2], generator=gen(3), output_type="latent").frames
    b = pipe(class_labels=[2], generator=gen(3), output_type="latent").frames
    c = pipe(class_labels=[2], generator=gen(4), output_type="latent").frames
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_default_static_path_gives_the_dynamic_caches_tokens(pipe):
    # the default (the static path, with graphs on CUDA) gives the tokens of transformers' DynamicCache; compiling
    # needs the static path
    default = pipe(class_labels=[2], generator=gen(3), output_type="latent").frames
    dynamic = pipe(class_labels=[2], generator=gen(3), output_type="latent", cache_implementation="dynamic").frames
    assert torch.equal(default, dynamic) and pipe.transformer._static_decoder is not None
    with pytest.raises(ValueError, match="compile_decode needs"):
        pipe(class_labels=[2], cache_implementation="dynamic", compile_decode=True)


def test_nan_from_the_tokenizer_raises_a_clear_error(pipe):
    decoder_weight = pipe.video_tokenizer.decoder_layers[0].conv.weight
    kept = decoder_weight.detach().clone()
    with torch.no_grad():
        decoder_weight[0] = float("nan")
    try:
        with pytest.raises(FloatingPointError, match="tokenizer decoded .* NaN or infinite values"):
            pipe(class_labels=[1], generator=gen(0), output_type="np")
        with pytest.raises(FloatingPointError, match="NaN or infinite"):
            list(pipe.stream(class_labels=[1], generator=gen(0)))
    finally:
        with torch.no_grad():
            decoder_weight.copy_(kept)


def test_nan_logits_are_reported_however_generation_stops():
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.lm_head.weight.fill_(float("nan"))
    interrupt = lambda p, i, t, kw: (setattr(p, "_interrupt", i == 5), {})[1]  # noqa: E731
    runs = [lambda: pipe(class_labels=[1], output_type="np"),
            lambda: list(pipe.stream(class_labels=[1], num_frames=1)),  # stops after the first latent frame
            lambda: pipe(class_labels=[1], output_type="np", callback_on_step_end=interrupt)]
    for run in runs:
        with pytest.raises(FloatingPointError, match="NaN or infinite logits"):
            run()


def test_batch_equals_single_runs(pipe):
    batch = pipe(class_labels=[0, "square"], num_videos_per_prompt=2, generator=[gen(s) for s in range(4)],
                 output_type="np").frames
    singles = [pipe(class_labels=[c], generator=gen(s), output_type="np").frames[0]
               for s, c in enumerate([0, 0, 1, 1])]
    np.testing.assert_allclose(batch, np.stack(singles), atol=1e-5)  # batched convolutions round differently
    tokens = pipe(class_labels=[0, 1], generator=[gen(0), gen(1)], output_type="latent").frames
    assert torch.equal(tokens, torch.cat([pipe(class_labels=[c], generator=gen(c), output_type="latent").frames
                                          for c in (0, 1)]))


def test_class_names_and_errors(pipe):
    by_name = pipe(class_labels=["triangleup"], generator=gen(0), output_type="latent").frames
    assert torch.equal(by_name, pipe(class_labels=[2], generator=gen(0), output_type="latent").frames)
    with pytest.raises(ValueError, match=r"unknown class name 'hexagon'; valid names: \['circle', 'square', 'TriangleUp'\]"):
        pipe(class_labels=["hexagon"])
    with pytest.raises(ValueError, match=r"ints in \[0, 3\)"):
        pipe(class_labels=[7])
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        pipe(class_labels=[0], num_frames=0)
    with pytest.raises(ValueError, match="token grid of one window: num_frames must be 5"):
        pipe(class_labels=[0], num_frames=9, output_type="latent")
    with pytest.raises(ValueError, match=r"context_frames must be one of \[1, 3\]"):
        pipe(class_labels=[0], num_frames=9, context_frames=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], output_type="gif")
    with pytest.raises(ValueError, match="pass class_labels"):
        pipe()
    with pytest.raises(ValueError, match="generators for a batch of 2"):
        pipe(class_labels=[0, 1], generator=[gen(0)])


def test_class_label_forms_and_errors(pipe, frames_pipe):
    one = pipe(class_labels=[1], generator=gen(0), output_type="latent").frames
    for labels in (1, np.int64(1), [np.int32(1)], torch.tensor(1), torch.tensor([1]), np.array([1]), "square"):
        assert torch.equal(pipe(class_labels=labels, generator=gen(0), output_type="latent").frames, one), labels
    # floats are not truncated to a class, and an empty list is refused up front
    for labels in ([1.7], torch.tensor([1.9]), np.array([1.0]), 1.7, [True]):
        with pytest.raises(ValueError, match=r"class_labels must be ints in \[0, 3\) or class names; got"):
            pipe(class_labels=labels)
    with pytest.raises(ValueError, match=r"class_labels is empty: give at least one label \(ints in \[0, 3\)"):
        pipe(class_labels=[])
    # a model that is not class-conditional says so
    free = tiny_pipeline(mode="none")
    for model, kw in ((free, {}), (frames_pipe, dict(video=torch.rand(3, 3, 8, 8)))):
        mode = model.transformer.config.condition_mode
        for labels in ([0], ["cat"]):
            with pytest.raises(ValueError, match=f"not class-conditional \\(condition_mode='{mode}'\\); do not pass"):
                model(class_labels=labels, **kw)


def test_decode_batch_size_is_checked_before_any_step(pipe):
    steps = []
    with pytest.raises(ValueError, match="decode_batch_size must be a positive int or None, got 0"):
        pipe(class_labels=[1], decode_batch_size=0, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {})
    assert not steps


def test_numpy_integer_decode_batch_size(pipe):
    # accepted by the pipeline's check and by the tokenizer it is handed to
    expected = pipe(class_labels=[0, 1], generator=gen(0), output_type="np").frames
    for size in (np.int64(1), np.int32(2)):
        np.testing.assert_allclose(pipe(class_labels=[0, 1], generator=gen(0), output_type="np",
                                        decode_batch_size=size).frames, expected, atol=1e-5)
    streamed = [c.frames for c in pipe.stream(class_labels=[0, 1], generator=gen(0), decode_batch_size=np.int64(1))]
    np.testing.assert_allclose(np.concatenate(streamed, axis=1), expected, atol=1e-5)


def test_batch_size_and_context_frames_must_be_positive_ints(pipe):
    free = tiny_pipeline(mode="none")
    assert free(batch_size=2, generator=gen(0), output_type="latent").frames.shape[0] == 2
    assert free(batch_size=np.int64(2), generator=gen(0), output_type="latent").frames.shape[0] == 2
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"batch_size must be a positive int .* got {bad!r}"):
            free(batch_size=bad, output_type="latent")
        with pytest.raises(ValueError, match=f"batch_size must be a positive int .* got {bad!r}"):
            next(free.stream(batch_size=bad))
    for bad in (3.0, True):
        with pytest.raises(ValueError, match=rf"context_frames must be one of \[1, 3\] .* got {bad!r}"):
            pipe(class_labels=[0], num_frames=9, context_frames=bad)


def test_context_video_lengths_follow_the_blocks():
    # blocks of 2 latent frames (4 in a window): a context is 2 latent frames, i.e. 3 pixel frames
    blocks = tiny_pipeline(mode="frames", block=(2, 2, 2), latent_shape=(4, 4, 4), num_context_frames=2)
    for frames in (1, 2, 5):
        with pytest.raises(ValueError, match=rf"context video must have one of \[3\] frames .* got {frames}$"):
            blocks(video=torch.rand(frames, 3, 8, 8))
    assert blocks(video=torch.rand(3, 3, 8, 8), generator=gen(0), output_type="np").frames.shape == (1, 7, 8, 8, 3)


def test_longer_videos_continue_window_by_window(pipe, frames_pipe):
    T, labels = pipe.num_frames, [0, 2]  # windows of 5 frames; each further one continues the last 3 (2 new)
    long = pipe(class_labels=labels, generator=[gen(0), gen(1)], num_frames=11, output_type="pt").frames
    assert long.shape == (2, 11, 3, 8, 8)
    # the first window is the ordinary call; the next continues its last 3 frames with the same generators
    generators = [gen(0), gen(1)]
    first = pipe(class_labels=labels, generator=generators, output_type="pt").frames
    assert torch.equal(long[:, :T], first)
    second = pipe(class_labels=labels, generator=generators, video=first[:, -3:], output_type="pt").frames
    assert torch.equal(long[:, T:T + 2], second[:, 3:])
    # stream() hands out the same frames (it decodes as overlap_decode does) and stops at num_frames
    overlapped = pipe(class_labels=labels, generator=[gen(0), gen(1)], num_frames=8, output_type="pt",
                      overlap_decode=True).frames
    np.testing.assert_allclose(overlapped, long[:, :8], atol=1e-5)
    chunks = list(pipe.stream(class_labels=labels, generator=[gen(0), gen(1)], num_frames=8, output_type="pt"))
    assert [c.start_frame for c in chunks] == [0] + list(np.cumsum([c.frames.shape[1] for c in chunks])[:-1])
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert torch.equal(torch.cat([c.frames for c in chunks], dim=1), overlapped)
    # one context frame, several videos per prompt, and a frame-prediction model continuing its given frames
    one = pipe(class_labels=[1], num_videos_per_prompt=2, generator=gen(3), num_frames=7, context_frames=1,
               output_type="np").frames
    assert one.shape == (2, 7, 8, 8, 3)
    assert pipe(class_labels=[1], generator=gen(3), num_frames=np.int64(6), output_type="np").frames.shape[1] == 6
    context = torch.rand(1, 3, 3, 8, 8)
    continued = frames_pipe(video=context, generator=gen(0), num_frames=9, output_type="pt").frames
    assert continued.shape == (1, 9, 3, 8, 8)
    assert torch.equal(continued[:, :5], frames_pipe(video=context, generator=gen(0), output_type="pt").frames)
    # blocks of 3 latent frames: a window continues whole blocks (3 latent frames = 5 pixel frames)
    cfg = NBPConfig(latent_shape=[6, 4, 4], block_shape=[3, 1, 4], video_vocab_size=pipe.video_tokenizer.codebook_size,
                    condition_mode="class", num_classes=3, first_block="hybrid", hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4)
    blocks = NBPVideoPipeline(transformer=NBPForVideoGeneration(cfg).eval(), video_tokenizer=pipe.video_tokenizer)
    blocks.set_progress_bar_config(disable=True)
    assert blocks(class_labels=[0], generator=gen(0), num_frames=17, output_type="np").frames.shape == (1, 17, 8, 8, 3)
    with pytest.raises(ValueError, match=r"context_frames must be one of \[5\]"):
        blocks(class_labels=[0], num_frames=17, context_frames=3)


def test_class_labels_from_an_iterator_serve_every_window(pipe):
    expected = pipe(class_labels=[0, 2], generator=[gen(0), gen(1)], num_frames=9, output_type="np").frames
    once = pipe(class_labels=iter([0, 2]), generator=[gen(0), gen(1)], num_frames=9, output_type="np").frames
    np.testing.assert_array_equal(once, expected)
    chunks = pipe.stream(class_labels=(c for c in [0, 2]), generator=[gen(0), gen(1)], num_frames=9)
    np.testing.assert_allclose(np.concatenate([c.frames for c in chunks], axis=1), expected, atol=1e-5)


def test_a_model_without_class_names(pipe):
    # transformers fills id2label with two placeholder labels when none are given: they are not class names
    cfg = NBPConfig.from_dict({**pipe.transformer.config.to_dict(), "id2label": None, "label2id": None})
    unnamed = NBPVideoPipeline(transformer=NBPForVideoGeneration(cfg).eval(), video_tokenizer=pipe.video_tokenizer)
    unnamed.set_progress_bar_config(disable=True)
    assert len(cfg.id2label) == 2 and unnamed.class_names == []
    assert unnamed(class_labels=[2], output_type="latent").frames.shape[0] == 1
    with pytest.raises(ValueError, match="unknown class name 'LABEL_0'; valid names: \\[\\]"):
        unnamed(class_labels=["LABEL_0"])


def test_callback_sees_and_modifies_tokens(pipe):
    seen = []

    def callback(p, step, timestep, kwargs):
        tokens = kwargs["video_tokens"]
        seen.append((step, int((tokens >= 0).sum(dim=1)[0])))
        if step == 3:  # the hybrid start's 4th token (video token 3): force it
            tokens = tokens.clone()
            tokens[:, 3] = 7
            return {"video_tokens": tokens}
        return {}

    out = pipe(class_labels=[0, 1], generator=gen(0), output_type="latent", callback_on_step_end=callback).frames
    steps = pipe.transformer.layout.decode_schedule(0)
    assert [s for s, _ in seen] == list(range(len(steps)))
    assert [n for _, n in seen] == [b for _, b in steps]  # tokens known after each step
    assert (out[:, 0, 0, 3] == 7).all()
    plain = pipe(class_labels=[0, 1], generator=gen(0), output_type="latent").frames
    assert not torch.equal(out, plain)  # later tokens were sampled after the forced one
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(class_labels=[0], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    # returned tokens are checked: shape, and ids of the generated positions
    V = pipe.transformer.config.video_vocab_size
    for bad, message in ((lambda t: t[:, :5], "of shape"), (lambda t: t.float(), "integer ids"),
                         (lambda t: t.masked_fill(t >= 0, V), f"outside \\[0, {V}\\)"),
                         (lambda t: t.masked_fill(t >= 0, -1), "outside")):
        with pytest.raises(ValueError, match=f"callback_on_step_end returned video_tokens.*{message}"):
            pipe(class_labels=[0], output_type="latent", callback_on_step_end=lambda p, i, t, kw: {
                "video_tokens": bad(kw["video_tokens"].clone())})
    # no tensor inputs asked for: the callback still runs
    calls = []
    pipe(class_labels=[0], output_type="latent", callback_on_step_end_tensor_inputs=None,
         callback_on_step_end=lambda p, i, t, kw: calls.append(kw) or {})
    assert calls and calls[0] == {}


def test_diffusers_callback_objects_and_num_timesteps(pipe):
    """A diffusers `PipelineCallback` (or `MultiPipelineCallbacks`) brings its own tensor_inputs, checked against the
    pipeline's, and reads `pipe.num_timesteps`, as in diffusers' pipelines."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    class PinAtCutoff(PipelineCallback):
        tensor_inputs = ["video_tokens"]

        def callback_fn(self, p, step, timestep, kwargs):
            if step == int(p.num_timesteps * self.config.cutoff_step_ratio):
                kwargs["video_tokens"][:, 0] = 7
            return kwargs

    class WantsLatents(PinAtCutoff):
        tensor_inputs = ["latents"]

    for callback in (PinAtCutoff(cutoff_step_ratio=0.5), MultiPipelineCallbacks([PinAtCutoff(cutoff_step_ratio=0.5)])):
        out = pipe(class_labels=[0], generator=gen(0), output_type="latent", callback_on_step_end=callback).frames
        assert out[0, 0, 0, 0] == 7
    assert pipe.num_timesteps == len(pipe.transformer.layout.decode_schedule(0))
    with pytest.raises(TypeError, match="positional"):  # pipe([0], None, 2) means num_frames=2: stream says so
        next(pipe.stream([0], None, 2))
    for call in (pipe, lambda **kw: next(pipe.stream(**kw))):
        with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs must be a subset of \['video_"):
            call(class_labels=[0], callback_on_step_end=WantsLatents())


def test_tokens_edited_in_place_by_a_callback_are_checked_at_that_step(pipe):
    V, steps = pipe.transformer.config.video_vocab_size, []

    def setting(value):
        def callback(p, step, timestep, kwargs):
            steps.append(step)
            if step == 3:
                kwargs["video_tokens"][:, 3] = value  # the live tensor, edited in place and returned
            return kwargs
        return callback

    with pytest.raises(ValueError, match=rf"callback_on_step_end returned video_tokens outside \[0, {V}\)"):
        pipe(class_labels=[0], output_type="latent", callback_on_step_end=setting(V))
    assert steps[-1] == 3  # refused at once, not after the remaining steps
    out = pipe(class_labels=[0, 1], generator=gen(0), output_type="latent", callback_on_step_end=setting(7)).frames
    assert (out[:, 0, 0, 3] == 7).all()


def test_interrupt_returns_complete_frames(pipe):
    def stop(p, step, timestep, kwargs):
        if step == 4 + 3:  # hybrid start (4 steps) + 3 blocks = latent frame 0 complete
            p._interrupt = True
        return {}

    out = pipe(class_labels=[0], generator=gen(0), output_type="np", callback_on_step_end=stop).frames
    assert out.shape[1] == 1

    def stop_at_once(p, step, timestep, kwargs):
        p._interrupt = True
        return {}

    for output_type in ("np", "latent"):
        with pytest.raises(RuntimeError, match="interrupted before any latent frame was complete"):
            pipe(class_labels=[0], output_type=output_type, callback_on_step_end=stop_at_once)
    assert NBPVideoPipeline(transformer=pipe.transformer, video_tokenizer=pipe.video_tokenizer).interrupt is False


def test_concurrent_requests_each_get_their_own_video(pipe, monkeypatch):
    # a server's threads, each with its own pipeline object over the shared components (the documented way to
    # interrupt one request alone); both start before either has claimed the generator's kept decode cache
    import threading

    from modeling_nbp import generation

    alone = {c: pipe(class_labels=[c], generator=gen(c), output_type="np").frames for c in (1, 2)}
    both_there, reset = threading.Barrier(2, timeout=5), generation.BlockKVCache.reset
    monkeypatch.setattr(generation.BlockKVCache, "reset", lambda cache, m: (both_there.wait(), reset(cache, m)))

    def stop(p, step, timestep, kwargs):
        p._interrupt = step == 4 + 3  # latent frame 0 complete
        return {}

    out = {}

    def request(c, callback=None):
        out[c] = NBPVideoPipeline.from_pipe(pipe)(class_labels=[c], generator=gen(c), output_type="np",
                                                  callback_on_step_end=callback).frames

    threads = [threading.Thread(target=request, args=(1, stop)), threading.Thread(target=request, args=(2,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(out[2], alone[2])
    assert out[1].shape[1] == 1
    np.testing.assert_allclose(out[1], alone[1][:, :1], atol=1e-5)


def test_streaming_matches_full_generation(pipe):
    full = pipe(class_labels=[0, 2], generator=gen(5), output_type="np").frames
    chunks = list(pipe.stream(class_labels=[0, 2], generator=gen(5)))
    assert [c.start_frame for c in chunks] == [0, 1, 3] and chunks[-1].done and not chunks[0].done
    # a frame is handed out as soon as its latent frame is complete, long before the last step
    assert chunks[0].step == 4 + 3 - 1
    np.testing.assert_allclose(np.concatenate([c.frames for c in chunks], axis=1), full, atol=1e-5)
    # decoding while generating gives the streamed frames exactly (one incremental decode), the full ones closely
    overlapped = pipe(class_labels=[0, 2], generator=gen(5), output_type="np", overlap_decode=True).frames
    np.testing.assert_array_equal(overlapped, np.concatenate([c.frames for c in chunks], axis=1))


def test_stream_runs_callbacks_as_call_does(pipe):
    def callback(seen):
        def edit(p, step, timestep, kwargs):  # records each window's steps and pins one id of a generated position
            seen.append(step)
            kwargs["video_tokens"][:, 0] = 7
            if len(seen) == first.num_steps + 5:  # in the second window
                p._interrupt = True
            return kwargs
        return edit

    first = next(pipe.transformer.iter_generation(class_labels=torch.tensor([0]), batch_size=1))
    called, streamed = [], []
    full = pipe(class_labels=[0], generator=gen(3), output_type="np", num_frames=13, overlap_decode=True,
                callback_on_step_end=callback(called)).frames
    chunks = list(pipe.stream(class_labels=[0], generator=gen(3), num_frames=13,
                              callback_on_step_end=callback(streamed)))
    assert streamed == called and called[:first.num_steps] == list(range(first.num_steps))
    assert 5 < full.shape[1] < 13 and not chunks[-1].done  # one window and part of the second
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks], axis=1), full)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        next(pipe.stream(class_labels=[0], callback_on_step_end=callback([]),
                         callback_on_step_end_tensor_inputs=["latents"]))


def test_overlapped_decoding_in_frame_prediction_and_interrupts(frames_pipe, pipe):
    context = np.random.default_rng(1).random((3, 8, 8, 3)).astype(np.float32)
    full = frames_pipe(video=context, generator=gen(0), output_type="pt").frames
    overlapped = frames_pipe(video=context, generator=gen(0), output_type="pt", overlap_decode=True).frames
    torch.testing.assert_close(overlapped, full, atol=1e-5, rtol=0)

    def stop(p, step, timestep, kwargs):
        if step == 4 + 3 + 4:  # latent frames 0 and 1 complete
            p._interrupt = True
        return {}

    short = pipe(class_labels=[1], generator=gen(2), output_type="np", callback_on_step_end=stop,
                 overlap_decode=True).frames
    assert short.shape[1] == 3
    np.testing.assert_allclose(short, pipe(class_labels=[1], generator=gen(2), output_type="np").frames[:, :3],
                               atol=1e-5)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = NBPVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    a = pipe(class_labels=[1], generator=gen(2), output_type="np").frames
    np.testing.assert_array_equal(loaded(class_labels=[1], generator=gen(2), output_type="np").frames, a)
    # diffusers' generic loader with the code the folder carries
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    generic.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generic(class_labels=[1], generator=gen(2), output_type="np").frames, a)
    # a mistyped folder is named as such, not sent to the Hub as a repo id
    for wrong in (str(tmp_path / "nope"), "./nope", "models/pretrained/nope"):
        with pytest.raises(FileNotFoundError, match="no folder at"):
            NBPVideoPipeline.from_pretrained(wrong)
    with pytest.MonkeyPatch.context() as monkeypatch:
        set_hub_offline(monkeypatch)
        with pytest.raises(OSError, match="pipeline 'someone/not-here' is neither a local folder .* nor a Hub repo"):
            NBPVideoPipeline.from_pretrained("someone/not-here")


def test_from_pipe_shares_the_components(tmp_path):
    """diffusers' `from_pipe` dropped the tokenizer (its class is not annotated on `__init__`, which the carried copy of
    the pipeline's file could not import) and then failed; it also cast the shared components to float32."""
    pipe = tiny_pipeline().to(torch.bfloat16)
    expected = pipe(class_labels=[1], generator=gen(2), output_type="latent").frames
    new = NBPVideoPipeline.from_pipe(pipe)
    assert (new.transformer, new.video_tokenizer) == (pipe.transformer, pipe.video_tokenizer)
    assert pipe.dtype == torch.bfloat16
    new.set_progress_bar_config(disable=True)
    assert torch.equal(new(class_labels=[1], generator=gen(2), output_type="latent").frames, expected)
    tok = tiny_tokenizer()
    assert NBPVideoPipeline.from_pipe(pipe, video_tokenizer=tok).video_tokenizer is tok
    NBPVideoPipeline.from_pipe(pipe, dtype={"transformer": torch.float16})  # the tokenizer keeps its bf16
    assert (pipe.transformer.dtype, pipe.video_tokenizer.dtype) == (torch.float16, torch.bfloat16)  # shared
    NBPVideoPipeline.from_pipe(pipe, dtype={"transformer": torch.float16, "default": torch.float32})
    assert (pipe.transformer.dtype, pipe.video_tokenizer.dtype) == (torch.float16, torch.float32)
    with pytest.raises(TypeError, match=r"unexpected arguments for NBPVideoPipeline.from_pipe: \['unet'\]"):
        NBPVideoPipeline.from_pipe(pipe, unet=None)
    # the class of a folder's carried code, as diffusers' loader gives it
    pipe.save_pretrained(tmp_path)
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    again = type(generic).from_pipe(generic)
    assert again.video_tokenizer is generic.video_tokenizer and str(again.name_or_path) == str(tmp_path)


def test_model_card(pipe, frames_pipe, tmp_path, monkeypatch):
    import re

    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder, model_card_notes="Trained on shapes.")  # the card loads from the folder itself
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "- next-block-prediction" in card
    assert "5 frames at 8x8 per window (3x4x4 latent tokens, blocks of 1x1x4 tokens, 15 steps)" in card
    assert "3 classes (circle, square, TriangleUp)" in card and "## Notes\n\nTrained on shapes." in card
    # its code runs as written (here the repo id is the folder itself)
    monkeypatch.chdir(tmp_path)
    exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), {})
    assert read_video("video.mp4")[0].shape == (5, 8, 8, 3)
    # a generated card is rewritten at every save; a card of the user's is kept
    pipe.save_pretrained(folder, model_card_notes="Trained longer.", carry_code=False)
    card = (folder / "README.md").read_text()
    assert "Trained longer." in card and "trust_remote_code" not in card  # no code carried: not promised
    (folder / "README.md").write_text("mine")
    pipe.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "mine"
    # unconditional models: the call needs no condition
    cfg = NBPConfig(latent_shape=[3, 4, 4], block_shape=[1, 1, 4], video_vocab_size=pipe.video_tokenizer.codebook_size,
                    condition_mode="none", first_block="bov", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    free = NBPVideoPipeline(transformer=NBPForVideoGeneration(cfg).eval(), video_tokenizer=pipe.video_tokenizer)
    free.set_progress_bar_config(disable=True)
    free.save_pretrained(tmp_path / "free")
    free_card = (tmp_path / "free" / "README.md").read_text()
    assert "- Condition: unconditional." in free_card
    exec(re.search(r"```python\n(.*?)```", free_card, re.S).group(1), {})
    frames_card = frames_pipe.model_card(str(tmp_path / "frames"))
    assert "frame prediction: continues 1 given frame." in frames_card
    frames_pipe.save_pretrained(tmp_path / "frames", repo_id=str(tmp_path / "frames"))
    exec(re.search(r"```python\n(.*?)```", frames_card, re.S).group(1), {})
    assert read_video("video.mp4")[0].shape == (5, 8, 8, 3)


def test_save_frame_prediction_without_num_context_frames(tmp_path):
    # num_context_frames left at 0: the card shows the smallest context, one block of latent frames
    for block, latent_shape, given in (((1, 1, 4), (3, 4, 4), "1 given frame."),
                                       ((2, 2, 2), (4, 4, 4), "3 given frames.")):
        model = tiny_pipeline(mode="frames", block=block, latent_shape=latent_shape, num_context_frames=0)
        folder = tmp_path / f"block{block[0]}"
        model.save_pretrained(folder)
        assert f"frame prediction: continues {given}" in (folder / "README.md").read_text()
        assert {"README.md", "model_index.json", "pipeline_nbp_video.py"} <= {p.name for p in folder.iterdir()}
        loaded = NBPVideoPipeline.from_pretrained(folder)
        context = torch.rand(int(given.split()[0]), 3, 8, 8)
        np.testing.assert_array_equal(loaded(video=context, generator=gen(0), output_type="np").frames,
                                      model(video=context, generator=gen(0), output_type="np").frames)


def test_model_cpu_offload():
    """Under diffusers' model offloading (here onto the CPU itself) each phase moves its model to the execution
    device before allocating anything: the generator after the context's encoding, the tokenizer before decoding."""
    pipe = tiny_pipeline()
    kw = dict(class_labels=[1], output_type="np", num_frames=7)  # two windows: generate, decode, encode, generate
    expected = pipe(generator=gen(0), **kw).frames
    pipe.enable_model_cpu_offload(device="cpu")
    onloads, before_generation = [], []
    for name in ("transformer", "video_tokenizer"):
        hook = getattr(pipe, name)._hf_hook
        hook.pre_forward = lambda module, *a, _pre=hook.pre_forward, _name=name, **k: (
            onloads.append(_name), _pre(module, *a, **k))[1]
    iter_generation = pipe.transformer.iter_generation
    pipe.transformer.iter_generation = lambda *a, **k: (before_generation.append(onloads[-1]), iter_generation(*a, **k))[1]
    np.testing.assert_allclose(pipe(generator=gen(0), **kw).frames, expected, atol=1e-6)
    assert before_generation == ["transformer", "transformer"]
    with pytest.raises(ValueError, match="model CPU offloading"):
        list(pipe.stream(class_labels=[1]))
    # sequential offloading leaves the weights on the meta device between module calls: refused clearly
    sequential = tiny_pipeline()
    sequential.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="sequential CPU offloading"):
        sequential(class_labels=[1])


def test_from_pretrained_dtype(pipe, tmp_path):
    """Half-precision files load in float32 unless a dtype is asked for, and both components get the same one."""
    import copy

    half = copy.deepcopy(pipe).to(torch.float16)
    half.save_pretrained(tmp_path)
    default = NBPVideoPipeline.from_pretrained(tmp_path)
    assert (default.transformer.dtype, default.video_tokenizer.dtype) == (torch.float32, torch.float32)
    asked = NBPVideoPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert (asked.transformer.dtype, asked.video_tokenizer.dtype) == (torch.bfloat16, torch.bfloat16)


def test_from_pretrained_dtype_argument_and_per_component_dict(pipe, tmp_path):
    """`dtype` (diffusers' name since torch_dtype's deprecation) and a dict per component with a "default"."""
    pipe.save_pretrained(tmp_path)
    dtypes = lambda p: (p.transformer.dtype, p.video_tokenizer.dtype)  # noqa: E731
    assert dtypes(NBPVideoPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)) == (torch.bfloat16,) * 2
    for name in ("dtype", "torch_dtype"):
        mixed = NBPVideoPipeline.from_pretrained(tmp_path, **{name: {"transformer": torch.bfloat16,
                                                                     "default": torch.float16}})
        assert dtypes(mixed) == (torch.bfloat16, torch.float16)
    no_default = NBPVideoPipeline.from_pretrained(tmp_path, dtype={"video_tokenizer": torch.bfloat16})
    assert dtypes(no_default) == (torch.float32, torch.bfloat16)
    # a dtype's name, as a command line or a config gives it
    assert dtypes(NBPVideoPipeline.from_pretrained(tmp_path, torch_dtype="bfloat16")) == (torch.bfloat16,) * 2
    named = NBPVideoPipeline.from_pretrained(tmp_path, dtype={"transformer": "float16", "default": "bfloat16"})
    assert dtypes(named) == (torch.float16, torch.bfloat16)
    for bad in ("auto", "bf16", "int64", 3):
        with pytest.raises(ValueError, match=rf"dtype must be a floating torch dtype or its name.* got {bad!r}"):
            NBPVideoPipeline.from_pretrained(tmp_path, dtype=bad)
    with pytest.raises(ValueError, match="pass dtype or torch_dtype .*, not both"):
        NBPVideoPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"unknown components \['vae'\]; .* \['transformer', 'video_tokenizer', 'default'\]"):
        NBPVideoPipeline.from_pretrained(tmp_path, dtype={"vae": torch.float16})


def test_from_pretrained_variant_none(pipe, tmp_path):
    # variant=None (a script's unset option) means no variant, as in diffusers
    pipe.save_pretrained(tmp_path)
    assert NBPVideoPipeline.from_pretrained(tmp_path, variant=None).num_frames == pipe.num_frames


def test_frame_prediction(frames_pipe):
    rng = np.random.default_rng(0)
    context = rng.random((3, 8, 8, 3)).astype(np.float32)  # 3 pixel frames = 2 latent frames (2x in time)
    out = frames_pipe(video=context, generator=gen(0), output_type="latent").frames
    expected = frames_pipe.video_tokenizer.encode(torch.from_numpy(context).permute(3, 0, 1, 2)[None])
    assert torch.equal(out[:, :2], expected)
    video = frames_pipe(video=context, generator=gen(0), output_type="np", num_videos_per_prompt=2).frames
    assert video.shape == (2, 5, 8, 8, 3)
    with pytest.raises(ValueError, match="context video must be 8x8"):
        frames_pipe(video=np.zeros((3, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"context video must have one of \[1, 3\] frames"):
        frames_pipe(video=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="values must lie in"):
        frames_pipe(video=np.full((3, 8, 8, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="pass video="):
        frames_pipe()
    uint8 = (context * 255).round().astype(np.uint8)
    pil = [PIL.Image.fromarray(f) for f in uint8]
    assert torch.equal(frames_pipe(video=pil, generator=gen(0), output_type="latent").frames,
                       frames_pipe(video=uint8, generator=gen(0), output_type="latent").frames)


def test_a_list_of_videos_in_any_form_and_malformed_videos(frames_pipe):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    pil = lambda v: [PIL.Image.fromarray(f) for f in v]  # noqa: E731
    batch = preprocess_video(np.stack([a, b]))
    # a list of videos, each in any single-video form (as diffusers' VideoProcessor takes them)
    for videos in ([a, b], [pil(a), pil(b)], [torch.from_numpy(a).permute(0, 3, 1, 2), b[None]],
                   [a.astype(np.float32) / 255, torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255]):
        torch.testing.assert_close(preprocess_video(videos), batch, atol=1e-7, rtol=0)

    def latent(video):
        return frames_pipe(video=video, generator=[gen(0), gen(1)], output_type="latent").frames

    assert torch.equal(latent([a, pil(b)]), latent(np.stack([a, b])))
    # clear errors, each naming the shape as given
    with pytest.raises(ValueError, match=r"same number of frames and size; got \(frames, height, width\) "
                                         r"\[\(1, 8, 8\), \(3, 8, 8\)\]"):
        frames_pipe(video=[pil(a), pil(b)[:1]])
    with pytest.raises(ValueError, match=r"frames of a video must have one size; got \(width, height\)"):
        frames_pipe(video=pil(a)[:2] + [PIL.Image.new("RGB", (16, 16))])
    with pytest.raises(ValueError, match=r"video holds no frames or pixels: got shape \(0, 8, 8, 3\)"):
        frames_pipe(video=np.zeros((0, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"video is an empty list"):
        frames_pipe(video=[])
    with pytest.raises(ValueError, match=r"must be \(T, 3, H, W\) or \(B, T, 3, H, W\); got \(3, 8, 8, 3\)$"):
        frames_pipe(video=torch.from_numpy(a))  # channels last
    with pytest.raises(ValueError, match=r"must be \(T, H, W, 3\) or \(B, T, H, W, 3\); got \(3, 3, 8, 8\)$"):
        frames_pipe(video=a.transpose(0, 3, 1, 2))  # channels first


def test_inputs_that_disagree_on_the_number_of_videos_are_named(pipe):
    video = np.random.default_rng(0).random((1, 8, 8, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="class_labels, video give different numbers of videos: class_labels: 2, "
                                         "video: 1"):
        pipe(class_labels=[0, 1], video=video)
    with pytest.raises(ValueError, match="class_labels, batch_size give different numbers of videos: "
                                         "class_labels: 2, batch_size: 3"):
        pipe(class_labels=[0, 1], batch_size=3)
    # a batch_size that agrees is accepted, with several videos per prompt too
    many = pipe(class_labels=[0, 1], batch_size=2, num_videos_per_prompt=2, generator=gen(0), output_type="latent")
    assert many.frames.shape[0] == 4


def test_guidance_runs_batched(pipe):
    a = pipe(class_labels=[0], guidance_scale=3.0, generator=gen(0), output_type="latent").frames
    b = pipe(class_labels=[0], guidance_scale=1.0, generator=gen(0), output_type="latent").frames
    assert a.shape == b.shape and not torch.equal(a, b)
    # one forward per step for both halves: as many forwards as steps, each over a doubled batch (counted on the
    # dynamic cache's path, which calls the model's forward)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args, kw: batches.append(kw["input_ids"].shape[0]),
                                                      with_kwargs=True)
    try:
        guided = pipe(class_labels=[0, 2], guidance_scale=3.0, generator=[gen(0), gen(1)], output_type="latent",
                      cache_implementation="dynamic").frames
    finally:
        hook.remove()
    assert len(batches) == len(pipe.transformer.layout.decode_schedule(0)) and set(batches) == {4}
    # and each video is the one guided alone
    assert torch.equal(guided[:1], a)


def test_hub_push_and_pull(pipe, local_hub, monkeypatch, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download

    pipe.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="test-user/nbp-tiny")
    # diffusers' push_to_hub uploads the same folder with this pipeline's card; a card already on the Hub is kept
    pipe.push_to_hub("nbp-other", variant="fp16")  # the card names the full repo id (and the variant)
    card = Path(hf_hub_download("test-user/nbp-other", "README.md")).read_text()
    assert 'NBPVideoPipeline.from_pretrained("test-user/nbp-other", variant="fp16")' in card
    files = HfApi().list_repo_files("test-user/nbp-other")
    assert "pipeline_nbp_video.py" in files and "transformer/model.fp16.safetensors" in files
    assert NBPVideoPipeline.from_pretrained("test-user/nbp-other", variant="fp16").num_frames == pipe.num_frames
    HfApi().upload_file(path_or_fileobj=b"my card", path_in_repo="README.md", repo_id="test-user/nbp-other")
    pipe.push_to_hub("test-user/nbp-other")
    assert Path(hf_hub_download("test-user/nbp-other", "README.md")).read_text() == "my card"
    expected = pipe(class_labels=[2], generator=gen(1), output_type="np").frames
    pulled = NBPVideoPipeline.from_pretrained("test-user/nbp-tiny")
    pulled.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(pulled(class_labels=[2], generator=gen(1), output_type="np").frames, expected)
    local_hub.stop()
    set_hub_offline(monkeypatch)
    offline = NBPVideoPipeline.from_pretrained("test-user/nbp-tiny")
    offline.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(offline(class_labels=[2], generator=gen(1), output_type="np").frames, expected)


def test_remote_code_without_the_package(pipe, tmp_path):
    import importlib.util

    pipe.save_pretrained(tmp_path / "pipe")
    triton = importlib.util.find_spec("triton") is not None  # on CPU under Triton's interpreter (conftest)
    expected = pipe(class_labels=[1], generator=gen(2), output_type="np").frames
    np.save(tmp_path / "expected.npy", expected)
    pipe.save_pretrained(tmp_path / "other")  # a folder someone else made: its code must not run untrusted
    for code in (tmp_path / "other").rglob("*.py"):
        code.write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n" + code.read_text())
    stdout = run_without_package(f"""
        import logging
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        warnings = []  # diffusers' import check of the carried code finds every package it needs installed
        handler = logging.Handler()
        handler.emit = lambda record: warnings.append(record.getMessage())
        logging.getLogger("diffusers").addHandler(handler)
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r}, trust_remote_code=True)
        assert not [w for w in warnings if "pip install" in w], warnings
        out = pipe(class_labels=[1], generator=torch.Generator().manual_seed(2), output_type="np").frames
        np.testing.assert_array_equal(out, np.load({str(tmp_path / 'expected.npy')!r}))
        # download, change, share again: a pipeline loaded from carried code saves a folder that loads the same way
        pipe.save_pretrained({str(tmp_path / 'again')!r})
        again = DiffusionPipeline.from_pretrained({str(tmp_path / 'again')!r}, trust_remote_code=True)
        out = again(class_labels=[1], generator=torch.Generator().manual_seed(2), output_type="np").frames
        np.testing.assert_array_equal(out, np.load({str(tmp_path / 'expected.npy')!r}))
        # the class's own from_pretrained runs another folder's code only when trusted, as diffusers' loader does
        try:
            type(pipe).from_pretrained({str(tmp_path / 'other')!r})
            raise AssertionError("not refused")
        except ValueError as err:
            assert "trust_remote_code=True" in str(err)
        # with a dtype's name
        half = type(pipe).from_pretrained({str(tmp_path / 'pipe')!r}, dtype="bfloat16", trust_remote_code=True)
        assert (half.transformer.dtype, half.video_tokenizer.dtype) == (torch.bfloat16,) * 2
        # a component of one's own: diffusers' loader cannot check its class without the package, from_pipe can
        try:
            type(pipe).from_pretrained({str(tmp_path / 'pipe')!r}, transformer=half.transformer)
            raise AssertionError("not refused")
        except TypeError as err:
            assert "cannot take transformer: load the folder, then swap in yours with `type(pipe).from_pipe" in str(err)
        mixed = type(pipe).from_pipe(pipe, transformer=half.transformer)
        assert mixed.transformer is half.transformer and mixed.video_tokenizer is pipe.video_tokenizer
        if {triton}:  # the kernels of the tokenizer's Triton norm came with the code
            pipe.video_tokenizer.norm_implementation = "triton"
            assert pipe.video_tokenizer.encode(torch.rand(1, 3, 5, 8, 8)).shape == (1, 3, 4, 4)
        print("remote ok", type(pipe).__module__)
    """, tmp_path / "modules")
    assert "remote ok diffusers_modules" in stdout and not (tmp_path / "ran").exists()


def test_relative_imports_in_every_form():
    source = ("from .fsq import FSQ\n"
              "    from . import norm_kernels  # imports triton\n"
              "from . import a, b as c\n"
              "from . import (d,  # why\n    e as f,\n)\n"
              "from .. import g\n"
              "import h\n")
    assert _relative_imports(source) == ["fsq", "norm_kernels", "a", "b", "d", "e"]


def test_carried_code_holds_the_kernel_modules(pipe, tmp_path):
    # imported inside functions as `from . import x` / `from .x import y`: the Triton options need them
    pipe.save_pretrained(tmp_path)
    assert {"decode_kernels.py", "loss_kernels.py"} <= {p.name for p in (tmp_path / "transformer").iterdir()}
    assert "norm_kernels.py" in {p.name for p in (tmp_path / "video_tokenizer").iterdir()}


def test_save_without_code_names_the_installed_modules(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, carry_code=False)
    assert not list(tmp_path.rglob("*.py"))
    loaded = NBPVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(loaded(class_labels=[0], generator=gen(1), output_type="np").frames,
                                  pipe(class_labels=[0], generator=gen(1), output_type="np").frames)


def test_the_pipeline_runs_a_compiled_tokenizer():
    """`tok.encode = torch.compile(tok.encode)` (and decode) as a user sets them: the pipeline's calls trace as one
    graph each (fullgraph) and give the eager frames, in frame prediction (encode and decode) and longer videos."""
    pipe = tiny_pipeline(mode="frames")
    tok = pipe.video_tokenizer
    context = np.random.default_rng(1).random((3, 8, 8, 3)).astype(np.float32)
    expected = pipe(video=context, generator=gen(0), num_frames=9, output_type="pt").frames
    tok.encode, tok.decode = (torch.compile(f, fullgraph=True, backend="eager") for f in (tok.encode, tok.decode))
    try:
        frames = pipe(video=context, generator=gen(0), num_frames=9, output_type="pt").frames
    finally:
        del tok.encode, tok.decode
    torch.testing.assert_close(frames, expected, atol=1e-6, rtol=0)
