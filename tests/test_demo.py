"""The README's main command (`make demo` = `nbp demo`) end to end, with the bundled model."""

import os

import numpy as np
import PIL.Image
import pytest

from modeling_nbp.demo import DEMO_MODEL, main as demo
from modeling_nbp.video_io import read_video
from test_moving_digits import best_matching_class, class_templates

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEMO_MODEL, "model_index.json")),
                                reason="the bundled demo model is not in this checkout")


def test_demo_writes_every_promised_file(tmp_path):
    written = demo(["--output_dir", str(tmp_path)])
    names = [str(d) for d in range(10)]
    for name in names:
        for ext in ("gif", "mp4"):
            path = tmp_path / f"{name}.{ext}"
            assert str(path) in written
            frames, _ = read_video(str(path))
            assert frames.shape == (17, 32, 32, 3)
            assert frames.max() > 100  # a bright digit on the black background, not an empty video
    # each class's video shows its digit: the class whose mean handwriting matches the frames best, by majority over
    # frames (9 of 10 when this test was written; another class's video in a file would match about none)
    templates = class_templates(digit_size=16)
    shown = []
    for name in names:
        gray = read_video(str(tmp_path / f"{name}.mp4"))[0].mean(axis=-1) / 255
        votes = [best_matching_class(gray[f], templates) for f in range(0, 17, 2)]
        shown.append(max(set(votes), key=votes.count))
    assert sum(s == int(n) for s, n in zip(shown, names)) >= 7, shown
    with PIL.Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 17 * 32 and sheet.size[1] >= 10 * 2 * 32  # 17 frames across, 2 videos per class
    frames, _ = read_video(str(tmp_path / "frame_prediction.gif"))
    assert frames.shape == (17, 10 * 32, 2 * 32, 3)  # true clips beside their continuations
    assert os.path.isfile(tmp_path / "frame_prediction.png")
    # the continuation starts from the given frames: the first frame matches the true clip closely
    assert np.abs(frames[0, :, :32].astype(float) - frames[0, :, 32:]).mean() < 20
    # and goes on from them: in the 4 generated frames after the 5 given ones each digit stays near the true clip's
    # (its centre of brightness 1.6 pixels away on average when this test was written; another clip's: about 9)
    rows, columns = np.mgrid[:32, :32]
    centre = lambda image: np.array([(image * rows).sum(), (image * columns).sum()]) / image.sum()  # noqa: E731
    gray = frames[5:9].astype(float).mean(axis=-1)
    pairs = [gray[f, 32 * k : 32 * k + 32] for f in range(4) for k in range(10)]  # (true | continued) side by side
    distances = [np.linalg.norm(centre(pair[:, :32]) - centre(pair[:, 32:])) for pair in pairs]
    assert np.mean(distances) < 4, distances
    frames, _ = read_video(str(tmp_path / "long_video.gif"))
    assert frames.shape == (53, 32, 3 * 32, 3) and frames[-1].max() > 100  # a digit is still there at the end


def test_demo_model_samples_with_its_generation_config_by_default():
    import torch

    from modeling_nbp import NBPVideoPipeline
    from modeling_nbp.demo import DEMO_SAMPLING

    pipe = NBPVideoPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    saved = pipe.transformer.generation_config
    assert saved.do_sample and {k: getattr(saved, k) for k in DEMO_SAMPLING} == DEMO_SAMPLING

    def latents(**sampling):
        return pipe(class_labels=[3], generator=torch.Generator().manual_seed(0), output_type="latent",
                    **sampling).frames

    assert torch.equal(latents(), latents(**DEMO_SAMPLING))


def test_demo_refuses_other_models_before_writing(tmp_path):
    from test_pipeline import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "tiny")  # class-conditional, but 5 frames of 8x8
    with pytest.raises(SystemExit, match="'class' model of 5 frames of 8x8: use `nbp generate"):
        demo(["--model", str(tmp_path / "tiny"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_demo_refuses_an_output_path_that_is_a_file_before_generating(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as exited:
        demo(["--output_dir", str(tmp_path / "taken"), "--model", str(tmp_path / "no model")])
    assert exited.value.code == 2 and "--output_dir" in capsys.readouterr().err


def test_class_names_from_a_model_cannot_name_files_outside_the_output_folder(tmp_path, monkeypatch):
    import json
    import shutil
    from types import SimpleNamespace

    from modeling_nbp import NBPVideoPipeline

    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    config = json.loads((model / "transformer" / "config.json").read_text())
    hostile = ["../escaped", str(tmp_path / "absolute"), "long_video", "a b", "a_b", "", "6", "7", "8", "9"]
    config["id2label"] = dict(enumerate(hostile))
    config["label2id"] = {name: i for i, name in enumerate(hostile)}
    (model / "transformer" / "config.json").write_text(json.dumps(config))

    def blank_videos(self, class_labels, num_videos_per_prompt=1, num_frames=17, **kwargs):  # the files are tested
        return SimpleNamespace(frames=np.zeros((len(class_labels) * num_videos_per_prompt, num_frames, 32, 32, 3)))

    monkeypatch.setattr(NBPVideoPipeline, "__call__", blank_videos)
    out = tmp_path / "out"
    written = demo(["--model", str(model), "--output_dir", str(out), "--videos_per_class", "1"])
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]
    assert all(os.path.dirname(path) == str(out) for path in written)
    assert len(set(written)) == len(written) == len(os.listdir(out)) == 2 * len(hostile) + 4
