"""Bad and borderline arguments of the public API get a clear error naming the argument, not an error from deep
inside torch, numpy or PIL, nor a silently wrong result."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.cache_utils import DynamicCache

from test_modeling_nbp import grid, make_model
from test_pipeline import tiny_pipeline
from modeling_nbp.fsq import FSQ
from modeling_nbp.video_io import export_to_gif, export_to_mp4, make_contact_sheet, read_video


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def frames_model():
    return make_model(mode="frames", first_block="none", num_context_frames=1)


GREEDY = dict(temperature=0.0)


@pytest.mark.parametrize("labels, error, match", [
    ([0, None], TypeError, "class_labels must be"),
    ({0, 1}, TypeError, "class_labels must be"),
    ([2**70], TypeError, "class_labels must be"),
    (torch.tensor([0], device="meta"), ValueError, "class_labels is on the meta device"),
    ([[0, 1], [1, 0]], ValueError, r"one label per video, shape \(batch,\) or \(batch, 1\); got shape \(2, 2\)"),
])
def test_unreadable_class_labels(model, labels, error, match):
    with pytest.raises(error, match=match):
        model.generate_video_tokens(class_labels=labels, **GREEDY)
    with pytest.raises(error, match=match):  # training reads them as generation does
        model(video_ids=torch.zeros(2, *model.layout.latent_shape, dtype=torch.long), class_labels=labels)


def test_a_column_of_class_labels_is_one_per_video(model):
    # (batch, 1), as a data loader may give them (a grid of labels made 4 videos of 2 rows before it was refused)
    column = model.generate_video_tokens(class_labels=torch.tensor([[0], [2]]), **GREEDY)
    assert torch.equal(column, model.generate_video_tokens(class_labels=[0, 2], **GREEDY))


@pytest.mark.parametrize("condition_ids, error, match", [
    ("abc", TypeError, "condition_ids must be"),
    (torch.tensor(1), ValueError, r"condition_ids must have shape \(batch, 1\)"),
    (torch.ones(1, 1, dtype=torch.long, device="meta"), ValueError, "condition_ids is on the meta device"),
])
def test_unreadable_condition_ids(model, condition_ids, error, match):
    with pytest.raises(error, match=match):
        model.generate_video_tokens(condition_ids=condition_ids, **GREEDY)


@pytest.mark.parametrize("context_ids, error, match", [
    ("abc", TypeError, "context_ids must be"),
    (torch.tensor(1), ValueError, r"context_ids must have shape \(batch, frames, 4, 4\)"),
    (torch.zeros(1, 1, 4, 4, dtype=torch.long, device="meta"), ValueError, "context_ids is on the meta device"),
])
def test_unreadable_context_ids(frames_model, context_ids, error, match):
    with pytest.raises(error, match=match):
        frames_model.generate_video_tokens(context_ids=context_ids, **GREEDY)


def test_sampling_values_beyond_float32_run_on_the_static_path_as_on_the_dynamic_one(model):
    # the static decoder keeps them in a float32 tensor, where filling in 1e300 raised a RuntimeError
    def run(cache, **kw):
        return model.generate_video_tokens(class_labels=[0, 1], top_k=0, top_p=1.0, cache_implementation=cache,
                                           generator=torch.Generator().manual_seed(0), **kw)

    assert torch.equal(run("static", temperature=1e300), run("dynamic", temperature=1e300))
    with pytest.raises(FloatingPointError, match=r"guidance_scale=1e\+300 .* overflows"):
        run("static", guidance_scale=1e300)


def test_generation_refuses_a_callback_that_is_not_callable(model):
    with pytest.raises(TypeError, match="callback must be a function"):
        model.generate_video_tokens(class_labels=[0], callback=5, **GREEDY)


def test_generate_refuses_a_generation_config_that_is_not_one(model):
    with pytest.raises(TypeError, match="generation_config must be a transformers GenerationConfig"):
        model.generate(class_labels=[0], generation_config={"top_k": 5})


def ids_and_labels(model):
    return model.prepare_training_inputs(grid(model), [0, 1])


@pytest.mark.parametrize("kwargs, error, match", [
    (lambda ids, lab: dict(input_ids=ids.float()), TypeError, "input_ids must be an integer tensor"),
    (lambda ids, lab: dict(input_ids=ids.bool()), TypeError, "input_ids must be an integer tensor"),
    (lambda ids, lab: dict(input_ids=ids.tolist()), TypeError, "must be a torch.Tensor"),
    (lambda ids, lab: dict(inputs_embeds=torch.randn(2, ids.shape[1], 31)), ValueError, "hidden_size=32"),
    (lambda ids, lab: dict(inputs_embeds=torch.zeros(2, ids.shape[1], 32, dtype=torch.long)), TypeError,
     "inputs_embeds must be a floating-point tensor"),
    (lambda ids, lab: dict(input_ids=ids, labels=lab.float()), TypeError, "labels must be an integer tensor"),
    (lambda ids, lab: dict(input_ids=ids, labels=lab.tolist()), TypeError, "labels must be an integer tensor"),
    (lambda ids, lab: dict(input_ids=ids, logits_to_keep=-1), ValueError, "logits_to_keep must be"),
    (lambda ids, lab: dict(input_ids=ids, logits_to_keep=2.0), ValueError, "logits_to_keep must be"),
    (lambda ids, lab: dict(input_ids=ids, logits_to_keep=[0, 1]), ValueError, "logits_to_keep must be"),
    (lambda ids, lab: dict(input_ids=ids, cache="x"), TypeError, "must be a transformers Cache"),
    (lambda ids, lab: dict(video_ids=grid_list(), class_labels=[0, 1]), TypeError, "must be an integer torch.Tensor"),
    (lambda ids, lab: dict(video_ids=torch.zeros(0, 3, 4, 4, dtype=torch.long), class_labels=[]), ValueError,
     r"video_ids must be token grids \(batch >= 1, 3, 4, 4\)"),
])
def test_forward_bad_inputs(model, kwargs, error, match):
    ids, labels = ids_and_labels(model)
    with pytest.raises(error, match=match):
        model(**kwargs(ids, labels))


def grid_list():
    return torch.zeros(2, 3, 4, 4, dtype=torch.long).tolist()


def test_forward_takes_narrow_integer_ids_and_a_dynamic_cache(model):
    ids, _ = ids_and_labels(model)
    want = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids.to(torch.uint8)).logits, want)
    torch.testing.assert_close(model(input_ids=ids, cache=DynamicCache(config=model.config)).logits, want)


# ---- pipeline -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.parametrize("condition_ids, error, match", [
    (torch.tensor(4), ValueError, r"condition_ids must have shape \(batch, condition tokens\)"),
    ("hi", TypeError, "condition_ids must be"),
])
def test_pipeline_condition_ids(pipe, condition_ids, error, match):
    with pytest.raises(error, match=match):
        pipe(condition_ids=condition_ids, output_type="latent", temperature=0.0)


def test_pipeline_refuses_a_callback_that_is_not_callable_before_generating(pipe):
    with pytest.raises(TypeError, match="callback_on_step_end must be a function"):
        pipe(class_labels=0, callback_on_step_end=5)
    with pytest.raises(TypeError, match="callback_on_step_end must be a function"):
        next(pipe.stream(class_labels=0, callback_on_step_end="x"))


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_encode_context_num_videos_per_prompt(n):
    frames_pipe = tiny_pipeline(mode="frames")
    with pytest.raises(ValueError, match="num_videos_per_prompt must be a positive int"):
        frames_pipe.encode_context(torch.rand(3, 3, 8, 8), num_videos_per_prompt=n)


# ---- FSQ, video files ---------------------------------------------------------------------------------------------
def test_fsq_takes_numpy_levels():
    assert FSQ(np.array([8, 5])).levels == (8, 5) and FSQ(np.array([8, 5])).codebook_size == 40


FRAMES = np.random.default_rng(0).random((3, 8, 8, 3)).astype(np.float32)


def test_numpy_and_integer_fps_write_the_rate(tmp_path):
    path = export_to_mp4(FRAMES, tmp_path / "a.mp4", fps=np.float32(10))
    assert read_video(path)[1] == 10
    assert len(read_video(path, select=lambda n: np.array([0, n - 1], dtype=np.int32))[0]) == 2
    with pytest.raises(ValueError, match="`select` must return integer indices"):  # 0.5 was read as frame 0
        read_video(path, select=lambda n: [0.5])
    with pytest.raises(ValueError, match="`fps` 1e\\+12 would repeat each of the video's"):  # tried to allocate TBs
        read_video(path, fps=1e12)
    assert len(read_video(path, fps=1000)[0]) == 100 * len(read_video(path)[0])  # upsampling stays possible


@pytest.mark.parametrize("write, kwargs, match", [
    (export_to_mp4, dict(fps=torch.tensor(8.0)), "`fps` must be a positive finite number"),
    (export_to_mp4, dict(fps="8"), "`fps` must be a positive finite number"),
    (export_to_mp4, dict(fps=True), "`fps` must be a positive finite number"),
    (export_to_mp4, dict(fps=1e-9), "`fps` must be at least"),  # was written as a 24 fps file
    (export_to_gif, dict(fps=1e-3), "`fps` must be at least"),
    (export_to_mp4, dict(crf="12"), "`crf` must be a number in"),
    (export_to_mp4, dict(crf=None), "`crf` must be a number in"),
])
def test_export_arguments(tmp_path, write, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write(FRAMES, tmp_path / "a.out", **kwargs)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("frames, match", [
    (np.zeros((3, 0, 8, 3), np.uint8), r"frames must have shape \(T, H, W, 3\) with T, H, W >= 1"),
    ([FRAMES[0], FRAMES[0, :4]], "the frames of `frames` must have one shape"),
    ([PIL.Image.new("RGB", (8, 8)), PIL.Image.new("RGB", (4, 4))], "the frames of `frames` must have one shape"),
])
def test_export_frames(tmp_path, frames, match):
    with pytest.raises(ValueError, match=match):
        export_to_mp4(frames, tmp_path / "a.mp4")


@pytest.mark.parametrize("kwargs, match", [
    (dict(columns=1.5), "`columns` must be an int >= 1"),
    (dict(gap=1.5), "`gap` must be an int >= 0"),
    (dict(gap=-5), "`gap` must be an int >= 0"),
    (dict(labels="ab"), "`labels` must be a list of one text per video"),
])
def test_contact_sheet_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_contact_sheet(np.zeros((2, 3, 8, 8, 3), np.uint8), **kwargs)
