import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import nn

from modeling_nbp.run_files import write_json
from modeling_nbp.training import common, train_tokenizer
from modeling_nbp.training.optim import lr_at_step
from modeling_nbp.training.tokenizer_losses import (PatchDiscriminator, adversarial_active, discriminator_loss,
                                                    generator_adversarial_loss, load_perceptual_model,
                                                    reconstruction_loss)
from modeling_nbp.training.train_tokenizer import (build_datasets, build_tokenizer, check_discriminator_input,
                                                     held_out_videos, main, parse_args)
from modeling_nbp.video_io import export_to_mp4
from modeling_nbp.video_tokenizer import NBPVideoTokenizer
from test_data import write_corrupt, write_counting_video
from train_helpers import fresh_accelerate_state, read_log, tensorboard_steps  # noqa: F401 (autouse fixture)

# 5 frames of 16 x 16 moving digits -> a 3 x 4 x 4 grid of 16 codes; 2 steps without the GAN, then 2 with it
CLIPS = ["--num_frames", "5", "--resolution", "16"]
SIZE = ["--base_channels", "8", "--channel_multipliers", "1,1", "--layers_per_block", "1", "--time_strides", "2",
        "--space_strides", "2", "--fsq_levels", "4,4", "--norm_num_groups", "4", "--patch_size", "2"]
TRAINING = ["--disc_base_channels", "8", "--disc_num_layers", "2", "--train_batch_size", "2", "--max_steps", "4",
            "--disc_start_step", "2", "--checkpointing_steps", "1", "--logging_steps", "1", "--eval_steps", "2",
            "--num_log_videos", "1", "--dataloader_num_workers", "0", "--report_to", "none", "--learning_rate", "1e-3",
            "--seed", "3"]
RUN = [*CLIPS, *SIZE, *TRAINING]
DIGITS = ["--dataset", "moving_digits", "--num_clips", "8", "--num_eval_clips", "2"]
TINY = [*DIGITS, *RUN]


def write_noise_videos(folder, count: int, frames: int = 40) -> str:
    """`count` 8 fps videos of 16 x 16 noise, longer than a clip: which window a clip is cut from shows in its loss."""
    rng = np.random.default_rng(0)
    for i in range(count):
        export_to_mp4(rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8), folder / "a" / f"{i}.mp4", fps=8)
    return str(folder)


class L1Distance(nn.Module):
    """A stand-in perceptual network: mean absolute difference per image."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean(dim=(1, 2, 3))


# ---- losses (values computed by hand) --------------------------------------------------------------------------
def test_reconstruction_loss_terms():
    target = torch.zeros(1, 1, 1, 2, 2)
    reconstruction = torch.tensor([1.0, -1.0, 0.0, 2.0]).view(1, 1, 1, 2, 2)
    total, parts = reconstruction_loss(reconstruction, target, l1_weight=2.0, l2_weight=0.5)
    assert parts["l1"].item() == 1.0 and parts["l2"].item() == 1.5  # (1 + 1 + 0 + 2) / 4, (1 + 1 + 0 + 4) / 4
    assert total.item() == pytest.approx(2.0 * 1.0 + 0.5 * 1.5)
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss(reconstruction, torch.zeros(1, 1, 1, 2, 3))


def test_gan_losses():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # hinge: relu(1 - real) = [0, 1], relu(1 + fake) = [0, 1.5]
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.5 + 0.75))
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(0.75)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = 0.5 * ((sp(-2) + sp(0)) / 2 + (sp(-2) + sp(0.5)) / 2)
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(expected, rel=1e-6)
    assert generator_adversarial_loss(fake, "non_saturating").item() == pytest.approx((sp(2) + sp(-0.5)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="GAN loss"):
        discriminator_loss(real, fake, "wasserstein")
    assert not adversarial_active(1, 2) and adversarial_active(2, 2)


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_gan_losses_of_bf16_logits_are_computed_in_float32(kind):
    """bf16 logits (a discriminator under autocast): 1 - logit or softplus(logit) in bf16 would round away the
    loss's low bits, e.g. 1 - (-3.140625) = 4.140625 needs 9 significant bits, bf16 holds 8."""
    real = torch.tensor([-3.140625, 0.3, 2.7, -0.01], dtype=torch.bfloat16)
    fake = torch.tensor([3.140625, -0.7, 0.02, 1.3], dtype=torch.bfloat16)
    d_loss, g_loss = discriminator_loss(real, fake, kind), generator_adversarial_loss(fake, kind)
    assert d_loss.dtype == g_loss.dtype == torch.float32
    assert d_loss.item() == discriminator_loss(real.float(), fake.float(), kind).item()
    assert g_loss.item() == generator_adversarial_loss(fake.float(), kind).item()


# 16 px -> 8 -> 4 (two strided convs) -> 3 -> 2 (two stride-1 4x4 convs); time keeps its 5 frames
@pytest.mark.parametrize("kind, shape", [("3d", (2, 1, 5, 2, 2)), ("2d", (10, 1, 2, 2))])
def test_patch_discriminator_scores_patches(kind, shape):
    disc = PatchDiscriminator(base_channels=8, num_layers=2, kind=kind)
    video = torch.rand(2, 3, 5, 16, 16)
    assert disc(video).shape == shape
    one = disc(video[:1])  # GroupNorm: a clip's scores do not depend on the rest of the batch
    torch.testing.assert_close(one, disc(video)[: one.shape[0]])
    with pytest.raises(ValueError, match="kind"):
        PatchDiscriminator(kind="4d")


def export_l1(path) -> str:
    """The stand-in network as a torch.export program with dynamic image batch and size."""
    n, h, w = torch.export.Dim("n"), torch.export.Dim("h"), torch.export.Dim("w")
    examples = (torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8))  # two tensors: one passed twice would alias
    shapes = ({0: n, 2: h, 3: w},) * 2
    torch.export.save(torch.export.export(L1Distance(), examples, dynamic_shapes=shapes), str(path))
    return str(path)


def test_perceptual_model_is_pluggable(tmp_path):
    assert load_perceptual_model("none") is None
    a, b = torch.zeros(1, 3, 2, 4, 4), torch.full((1, 3, 2, 4, 4), 0.25)
    for spec in (export_l1(tmp_path / "l1.pt2"), "test_train_tokenizer:L1Distance"):
        loss = load_perceptual_model(spec)
        assert loss(a, b).item() == pytest.approx(0.5)  # 0.25 in [0, 1] is 0.5 in [-1, 1]
        assert not any(p.requires_grad for p in loss.parameters())
        loss.train()  # never reaches the frozen network (an exported program cannot switch modes)
    with pytest.raises(ValueError, match="perceptual_model"):
        load_perceptual_model("vgg16")
    with pytest.raises(ValueError, match="no such"):
        load_perceptual_model(str(tmp_path / "missing.pt"))
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        load_perceptual_model("builtins:dict")


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="train_data"):
        parse_args(["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="time_strides"):
        build_tokenizer(parse_args([*TINY, "--output_dir", str(tmp_path), "--time_strides", "2,2"]))
    args = parse_args(["--dataset", "moving_digits", "--output_dir", str(tmp_path), "--max_steps", "1000"])
    assert (args.warmup_steps, args.disc_start_step) == (10, 200)  # 1% warmup (paper Table 5), GAN after 20%
    assert build_tokenizer(args).config.block_out_channels == (128, 256, 256, 512)  # official sizes by default
    # checked before training, not when the size flags are dropped, the GAN starts or the last evaluation runs
    base = ["--dataset", "moving_digits", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--fsq_levels, --patch_size cannot be combined with --tokenizer_config"):
        parse_args([*base, "--tokenizer_config", "tok.json", "--fsq_levels", "8,8", "--patch_size", "2"])
    with pytest.raises(ValueError, match="--resolution must be >= 11: the held-out SSIM"):
        parse_args([*base, "--resolution", "8"])
    with pytest.raises(ValueError, match="--disc_start_step must be >= 0"):
        parse_args([*base, "--disc_start_step", "-1"])
    with pytest.raises(ValueError, match="--resolution 16 is too small for the 3d discriminator with --disc_num_layers 3"):
        check_discriminator_input(parse_args([*base, "--resolution", "16"]))
    check_discriminator_input(parse_args([*base, "--resolution", "24"]))
    with pytest.raises(ValueError, match="--max_grad_norm must be >= 0 \\(0: no clipping\\), got -1.0"):
        parse_args([*base, "--max_grad_norm=-1"])  # clip_grad_norm_ would flip the gradients' sign
    for flag in ("--l1_weight", "--perceptual_weight", "--adversarial_weight"):  # maximised, or no GAN without a word
        with pytest.raises(ValueError, match=f"{flag} must be >= 0 \\(0: leave that loss out\\), got -0.1"):
            parse_args([*base, f"{flag}=-0.1"])
    assert args.disc_learning_rate == args.learning_rate  # by default
    assert parse_args([*base, "--disc_learning_rate", "0"]).disc_learning_rate == 0  # a frozen discriminator (was the
    with pytest.raises(ValueError, match="--disc_learning_rate must be >= 0"):       # tokenizer's rate)
        parse_args([*base, "--disc_learning_rate=-1e-4"])
    for flag in ("--eval_steps", "--num_log_videos"):  # a negative interval evaluated at every step
        with pytest.raises(SystemExit):
            parse_args([*base, f"{flag}=-1"])
    # data flags that the chosen data would ignore are refused (a preset's values are defaults, not given flags)
    folder = ["--train_data", str(tmp_path), "--output_dir", str(tmp_path)]
    for argv, message in [
            ([*base, "--fps", "4", "--resize", "crop"], "--fps, --resize would be ignored: these flags are read for "
                                                        "video folders (--train_data), not --dataset moving_digits"),
            ([*folder, "--num_clips", "5"], "--num_clips would be ignored: only --dataset moving_digits reads it"),
            ([*folder, "--validation_split", "val"], "--validation_split would be ignored: only --validation_data"),
            ([*folder, "--validation_data", "v", "--num_eval_clips", "3"],
             "--num_eval_clips would be ignored: --validation_data is held out whole")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_args(argv)
    assert parse_args([*base, "--preset", "k600"]).fps == 16


def test_held_out_clips_are_the_same_at_every_evaluation(tmp_path):
    for i in range(3):
        write_counting_video(tmp_path / "data" / "a" / f"{i}.mp4", frames=40)
    args = parse_args(["--train_data", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--num_frames",
                       "5", "--resolution", "16", "--num_eval_clips", "1"])
    train, held_out = build_datasets(args)
    assert len(train) == 2 and len(held_out) == 1
    assert torch.equal(held_out[0]["video"], held_out[0]["video"])  # training items read random windows
    from modeling_nbp.data.clips import load_clip

    centre = load_clip(held_out[0]["path"], num_frames=5, resolution=16, fps=args.fps, sampling="center")
    assert torch.equal(held_out[0]["video"], centre)  # the centre window, not one random draw that repeated


def test_held_out_clips_come_from_across_the_classes(tmp_path):
    for name in ("a", "b", "c"):
        for i in range(2):
            write_counting_video(tmp_path / "data" / name / f"{i}.mp4", frames=6)
    args = parse_args(["--train_data", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--num_frames",
                       "5", "--resolution", "16", "--num_eval_clips", "3"])
    train, held_out = build_datasets(args)
    assert sorted(held_out.index["label"]) == [0, 1, 2] and sorted(train.index["label"]) == [0, 1, 2]
    assert not set(train.index["path"]) & set(held_out.index["path"])
    assert held_out_videos(10, 4) == [1, 3, 6, 8] and held_out_videos(5, 4) == [0, 1, 3, 4]


def test_unreadable_held_out_clips_stop_the_run_before_training(tmp_path):
    data = tmp_path / "data"
    write_noise_videos(data, 3, frames=5)
    write_corrupt(data / "a" / "1.mp4", "random")  # the middle video: the held-out one
    args = ["--train_data", str(data), "--num_eval_clips", "1", *RUN, "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="none of the --num_eval_clips 1 videos held out of --train_data .* reads; "
                                         "hold out more \\(--num_eval_clips\\) or pass --validation_data"):
        main(args)
    write_corrupt(tmp_path / "validation" / "z" / "broken.mp4", "truncated")
    with pytest.raises(ValueError, match="no video of --validation_data .*validation \\(split 'test'\\) reads"):
        main(["--train_data", str(data), "--validation_data", str(tmp_path / "validation"), *RUN, "--output_dir",
              str(tmp_path / "run")])
    # nor a training folder none of whose videos reads (the run would train on nothing)
    for i in range(2):
        write_corrupt(tmp_path / "unreadable" / "a" / f"{i}.mp4", "random")
    with pytest.raises(ValueError, match="no training clip could be decoded: no video of --train_data .*unreadable "
                                         "reads"):
        main(["--train_data", str(tmp_path / "unreadable"), "--validation_data", str(data), *RUN, "--output_dir",
              str(tmp_path / "run")])
    assert not common.list_checkpoints(tmp_path / "run") and not (tmp_path / "run" / "train_log.jsonl").exists()


def test_an_unreadable_micro_batch_is_left_out_of_the_logged_losses(tmp_path):
    """Step 1 of 1 readable + 1 unreadable clip in two micro-batches logs the readable clip's loss, as a run on
    that clip alone does (the unreadable micro-batch trains zeros at weight 0; its loss was averaged in)."""
    write_noise_videos(tmp_path / "held", 1, frames=5)
    flags = [*RUN, "--train_batch_size", "1", "--max_steps", "1", "--validation_data", str(tmp_path / "held")]
    write_noise_videos(tmp_path / "alone", 1, frames=5)
    main(["--train_data", str(tmp_path / "alone"), *flags, "--output_dir", str(tmp_path / "run_alone")])
    write_noise_videos(tmp_path / "mixed", 1, frames=5)
    write_corrupt(tmp_path / "mixed" / "a" / "1.mp4", "random")
    main(["--train_data", str(tmp_path / "mixed"), *flags, "--gradient_accumulation_steps", "2",
          "--output_dir", str(tmp_path / "run_mixed")])
    alone, mixed = read_log(tmp_path / "run_alone")[0], read_log(tmp_path / "run_mixed")[0]
    assert mixed["total"] == pytest.approx(alone["total"], rel=1e-6) and mixed["l1"] == pytest.approx(alone["l1"])


class OneOfProcesses:
    """What `evaluate` uses of an Accelerator, as process `index` of `count`: its collectives return this process's
    part and keep what it reduced."""
    device, trackers = torch.device("cpu"), []

    def __init__(self, count: int, index: int):
        self.num_processes, self.process_index, self.is_main_process, self.reduced = count, index, index == 0, None

    def reduce(self, tensor, reduction):
        self.reduced = tensor.clone()
        return tensor

    def gather(self, tensor):
        return tensor.repeat(self.num_processes)

    def unwrap_model(self, model, keep_torch_compile=True):
        return model


def test_each_process_scores_its_share_of_the_held_out_clips(tmp_path):
    """Under several processes the held-out clips are shared out and the sums reduced (the main process scored them
    all while the others waited in a collective, which times out on a large --validation_data): process 0 of 2
    reconstructs the first 3 of 5 clips, process 1 the last 2, and their sums give the one-process scores."""
    args = parse_args([*TINY, "--num_eval_clips", "5", "--output_dir", str(tmp_path)])
    tokenizer, (_, held_out) = build_tokenizer(args).eval(), build_datasets(args)
    seen = []
    tokenizer.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    one = train_tokenizer.evaluate(OneOfProcesses(1, 0), tokenizer, held_out, 2, 1, str(tmp_path / "one"), 0)
    assert sum(seen) == 5
    processes, shares = [OneOfProcesses(2, 0), OneOfProcesses(2, 1)], []
    for process in processes:
        seen.clear()
        train_tokenizer.evaluate(process, tokenizer, held_out, 2, 1, str(tmp_path / str(process.process_index)), 2)
        shares.append(sum(seen))
    assert shares == [3, 2]
    psnr_sum, ssim_sum, count = (processes[0].reduced + processes[1].reduced).tolist()
    assert count == 5 and psnr_sum / count == pytest.approx(one["psnr"], rel=1e-5)
    assert ssim_sum / count == pytest.approx(one["ssim"], abs=1e-6)  # other batches: float rounding
    assert len(os.listdir(tmp_path / "0" / "samples" / "step-0000001")) == 3  # 2 clips and their contact sheet
    assert not (tmp_path / "1").exists()


def test_the_skip_summary_counts_the_clips_of_every_process(tmp_path, monkeypatch, capsys):
    """Each process reads its share of the clips: the summary at the end lists the videos every process skipped, not
    the main process's alone (here process 1 skipped a video twice, the main one none)."""
    gather = train_tokenizer.gather_object

    def gather_beside_process_1(items):
        skips = bool(items) and isinstance(items[0], tuple)  # (clips read, paths skipped), not videos to show
        return gather(items) + ([(6, ["data/a/broken.mp4"] * 2)] if skips else [])

    monkeypatch.setattr(train_tokenizer, "gather_object", gather_beside_process_1)
    main([*TINY, "--max_steps", "1", "--adversarial_weight", "0", "--output_dir", str(tmp_path)])
    assert "skipped 2 of 8 videos: data/a/broken.mp4, data/a/broken.mp4" in capsys.readouterr().out


def test_the_upload_comes_after_the_last_barrier(tmp_path, monkeypatch):
    """The other processes must not wait in a collective (and time out) while the main one uploads final/."""
    from accelerate import Accelerator

    events, barrier = [], Accelerator.wait_for_everyone
    monkeypatch.setattr(common, "create_hub_repo", lambda repo_id, private: repo_id)
    monkeypatch.setattr(train_tokenizer, "upload_to_hub", lambda *args, **kwargs: events.append("upload"))
    monkeypatch.setattr(Accelerator, "wait_for_everyone", lambda self: events.append("barrier") or barrier(self))
    main([*TINY, "--max_steps", "1", "--adversarial_weight", "0", "--output_dir", str(tmp_path), "--push_to_hub",
          "--hub_model_id", "me/tok"])
    assert events[-2:] == ["barrier", "upload"]


def test_the_final_folder_records_the_training_clips_for_pretokenize(tmp_path):
    """`nbp pretokenize --tokenizer RUN/final` cuts the clips the tokenizer was trained on (it cut 17 frames at
    128x128 and 8 fps, squashed, whatever they were); moving digits have no frame rate or resizing to record."""
    from modeling_nbp.data.pretokenize import main as pretokenize_main

    data = write_noise_videos(tmp_path / "data", 3, frames=10)
    main(["--train_data", data, "--num_eval_clips", "1", *RUN, "--max_steps", "1", "--adversarial_weight", "0",
          "--fps", "16", "--resize", "crop", "--output_dir", str(tmp_path / "run")])
    final = tmp_path / "run" / "final"
    assert json.loads((final / "training_clips.json").read_text()) == {
        "num_frames": 5, "resolution": 16, "fps": 16.0, "resize": "crop"}
    assert NBPVideoTokenizer.from_pretrained(final).latent_shape(5, 16, 16) == (3, 4, 4)
    pretokenize_main(["--data", data, "--tokenizer", str(final), "--output_dir", str(tmp_path / "tokens"), "--device",
                      "cpu"])
    clip = json.loads((tmp_path / "tokens" / "pretokenize.json").read_text())["clip"]
    assert (clip["num_frames"], clip["resolution"], clip["fps"], clip["resize"]) == (5, 16, 16, "crop")
    main([*TINY, "--max_steps", "1", "--adversarial_weight", "0", "--output_dir", str(tmp_path / "digits")])
    assert json.loads((tmp_path / "digits" / "final" / "training_clips.json").read_text()) == {
        "num_frames": 5, "resolution": 16}


def test_a_step_is_checkpointed_before_it_is_evaluated(tmp_path, monkeypatch):
    """...so a run killed while evaluating its last step resumes with nothing left to train: rerun, it evaluates
    the final weights (it reported the scores of an earlier evaluation, here none), and rerun again logs them once."""
    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    args = [*TINY, "--max_steps", "1", "--adversarial_weight", "0", "--output_dir", str(tmp_path),
            "--resume_from_checkpoint", "latest"]
    with monkeypatch.context() as patched:
        patched.setattr(train_tokenizer, "evaluate", failing_evaluation)
        with pytest.raises(RuntimeError, match="evaluation failed"):
            main(args)
    assert common.find_latest_checkpoint(tmp_path).endswith("checkpoint-1")  # the step evaluated is not lost
    for _ in range(2):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        summary = main(args)
        evaluations = [r for r in read_log(tmp_path) if "eval_psnr" in r]
        assert [r["step"] for r in evaluations] == [1] and summary["psnr"] == evaluations[0]["eval_psnr"]
    assert os.path.isfile(tmp_path / "samples" / "step-0000001" / "reconstruction_0.mp4")


# ---- training runs ---------------------------------------------------------------------------------------------
def test_random_clip_windows_resume_exactly(tmp_path):
    """Training clips from videos longer than a clip take random windows: drawn per item from its place in the data
    order, so a resumed run (here with DataLoader workers) cuts the clips the uninterrupted one cut."""
    data = write_noise_videos(tmp_path / "data", 8)
    args = ["--train_data", data, "--num_eval_clips", "1", *RUN]
    main([*args, "--output_dir", str(tmp_path / "run")])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", resumed / "checkpoint-2")
    # which videos are held out decides the training set: a resume cannot change it
    with pytest.raises(ValueError, match="data.num_eval_clips 1 on disk, 2 now"):
        main([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest", "--num_eval_clips", "2"])
    # nor can the videos of the folder (one more moves the held-out ones and the data order)
    shutil.copyfile(os.path.join(data, "a", "0.mp4"), os.path.join(data, "a", "8.mp4"))
    with pytest.raises(ValueError, match="trained with other settings \\(data.videos '[0-9a-f]+' on disk"):
        main([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    os.remove(os.path.join(data, "a", "8.mp4"))
    # a checkpoint from before the held-out videos were spread over the classes held out the last ones
    marker = resumed / "checkpoint-2" / common.CHECKPOINT_MARKER
    state = json.loads(marker.read_text())
    del state["data"]["held_out"]
    marker.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="data.held_out 'last' on disk, 'spread' now"):
        main([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    shutil.rmtree(resumed / "checkpoint-2")
    shutil.copytree(tmp_path / "run" / "checkpoint-2", resumed / "checkpoint-2")
    main([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest", "--dataloader_num_workers", "2"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "clips_per_s"} for r in rs if r["step"] > 2]  # noqa: E731
    assert strip(read_log(resumed)) == strip(read_log(tmp_path / "run"))


def test_training_runs_gan_starts_late_and_resumes_exactly(tmp_path, capsys):
    scripted = export_l1(tmp_path / "l1.pt2")
    run = tmp_path / "run"
    summary = main([*TINY, "--output_dir", str(run), "--perceptual_model", scripted, "--report_to", "tensorboard"])
    out = capsys.readouterr().out
    assert "step 2: PSNR" in out and "step 4: PSNR" in out and "done: 4 steps" in out
    assert 0 < summary["psnr"] < 100 and -1 <= summary["ssim"] <= 1

    records = [r for r in read_log(run) if "total" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert all(math.isfinite(v) for k, v in r.items() if k != "clips_per_s" and v is not None)
        assert r["perceptual"] == pytest.approx(2 * r["l1"], rel=1e-5)  # L1 distance in [-1, 1] = 2x L1 in [0, 1]
    assert all("discriminator" not in r and "g_adversarial" not in r for r in records[:2])
    assert all("discriminator" in r and "g_adversarial" in r for r in records[2:])
    # the discriminator's weights do not move before disc_start_step
    disc = [load_file(str(run / f"checkpoint-{s}" / "model_1.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(disc[0][k], disc[1][k]) for k in disc[0])
    assert any(not torch.equal(disc[1][k], disc[2][k]) for k in disc[0])
    assert [r["step"] for r in read_log(run) if "eval_psnr" in r] == [2, 4]
    assert os.path.isfile(run / "samples" / "step-0000004" / "reconstruction_0.mp4")
    reloaded = NBPVideoTokenizer.from_pretrained(run / "final")
    assert reloaded.latent_shape(5, 16, 16) == (3, 4, 4) and reloaded.codebook_size == 16

    # crash after step 2 (simulated: only checkpoint-2 survives), resume: steps 3-4 repeat exactly
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copytree(run / "logs", resumed / "logs")  # with steps 3-4 logged
    # what the checkpoint restores (clips, data order, optimizer, model, the GAN's start) cannot change on a resume
    for flags, change in [(["--num_clips", "9"], "data.num_clips 8 on disk, 9 now"),
                          (["--seed", "1"], "seed 3 on disk, 1 now"),
                          (["--learning_rate", "1e-5"], "optimization.disc_learning_rate 0.001 on disk, 1e-05 now; "
                                                       "optimization.learning_rate 0.001 on disk, 1e-05 now"),
                          (["--fsq_levels", "2,8"], "tokenizer.fsq_levels [4, 4] on disk, [2, 8] now"),
                          (["--disc_start_step", "3"], "optimization.disc_start_step 2 on disk, 3 now"),
                          (["--lr_schedule", "cosine"], "schedule.lr_schedule 'linear' on disk, 'cosine' now")]:
        with pytest.raises(ValueError, match=f"trained with other settings \\({re.escape(change)}\\)"):
            main([*TINY, "--output_dir", str(resumed), "--perceptual_model", scripted, "--resume_from_checkpoint",
                  "latest", *flags])
    main([*TINY, "--output_dir", str(resumed), "--perceptual_model", scripted, "--resume_from_checkpoint", "latest",
          "--report_to", "tensorboard"])
    assert "resumed from" in capsys.readouterr().out
    finished = main([*TINY, "--output_dir", str(resumed), "--perceptual_model", scripted, "--resume_from_checkpoint",
                     "latest", "--report_to", "tensorboard"])  # nothing left to train: the last scores (were NaN)
    assert (finished["loss"], finished["psnr"]) == (read_log(resumed)[-2]["total"], read_log(resumed)[-1]["eval_psnr"])
    assert tensorboard_steps(resumed / "logs" / "nbp-tokenizer", "train/total") == [1, 2, 3, 4]  # 3-4 shown once
    strip = lambda rs: [{k: v for k, v in r.items() if k != "clips_per_s"} for r in rs if r["step"] > 2]  # noqa: E731
    assert strip(read_log(resumed)) == strip(read_log(run))
    for name in ("model.safetensors", "model_1.safetensors"):  # tokenizer and discriminator
        a, b = load_file(str(run / "checkpoint-4" / name)), load_file(str(resumed / "checkpoint-4" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert common.find_latest_checkpoint(resumed).endswith("checkpoint-4")


def test_without_the_adversarial_loss_no_discriminator_is_trained_or_saved(tmp_path):
    run = tmp_path / "run"
    main([*TINY, "--output_dir", str(run), "--adversarial_weight", "0", "--max_steps", "3", "--disc_start_step", "1"])
    assert all("discriminator" not in r and "g_adversarial" not in r for r in read_log(run))
    assert not (run / "checkpoint-3" / "model_1.safetensors").exists() and (run / "checkpoint-3" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="optimization.discriminator False on disk, True now"):  # not switched on resume
        main([*TINY, "--output_dir", str(run), "--max_steps", "4", "--disc_start_step", "1",
              "--resume_from_checkpoint", "latest"])
    # the unused GAN settings (whose default start moves with --max_steps) do not stop a run from being extended,
    # and the extended run follows the schedule stretched to the new --max_steps (not the rate the checkpoint kept)
    main([*TINY, "--output_dir", str(run), "--adversarial_weight", "0", "--max_steps", "4", "--disc_start_step", "3",
          "--resume_from_checkpoint", "latest"])
    assert (run / "checkpoint-4").is_dir()
    assert [r["lr"] for r in read_log(run) if r["step"] == 4 and "lr" in r] == [lr_at_step(3, 1e-3, 4, 0, "linear")]


def test_a_resume_raising_max_steps_keeps_the_checkpoints_gan_start(tmp_path):
    """--disc_start_step left to its default (20% of --max_steps) on a resume: the checkpoint's start (1) is kept,
    not refused as a change to 0 (20% of 2 steps)."""
    i = TINY.index("--disc_start_step")
    args = [*TINY[:i], *TINY[i + 2:], "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest",
            "--num_log_videos", "0"]
    main([*args, "--max_steps", "1", "--disc_start_step", "1"])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main([*args, "--max_steps", "2"])
    assert [r["step"] for r in read_log(tmp_path) if "total" in r and "discriminator" in r] == [2]


def test_two_process_ddp_matches_one_process(tmp_path):
    """Tokenizer and discriminator (GAN on from step 1) under DDP over gloo: 2 x 2 clips = 1 x 4 clips."""
    import subprocess
    import sys
    from pathlib import Path

    args = [*TINY, "--max_steps", "3", "--disc_start_step", "1", "--eval_steps", "0", "--checkpointing_steps", "3"]
    main([*args, "--output_dir", str(tmp_path / "one"), "--train_batch_size", "4"])
    script = str(Path(__file__).resolve().parents[1] / "examples" / "train_tokenizer.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args,
               "--output_dir", str(tmp_path / "two"), "--train_batch_size", "2"]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 3 steps") == 1
    losses = lambda run: [r["total"] for r in read_log(tmp_path / run) if "total" in r]  # noqa: E731
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
    # each process scored one of the 2 held-out clips: the reduced scores are those of all of them
    scores = lambda run, key: [r[key] for r in read_log(tmp_path / run) if key in r]  # noqa: E731
    assert scores("two", "eval_psnr") == pytest.approx(scores("one", "eval_psnr"), rel=1e-4)
    assert scores("two", "eval_ssim") == pytest.approx(scores("one", "eval_ssim"), abs=1e-5)
    # Adam moves a weight by up to ~lr per step whatever its gradient's size, so where a gradient is near zero
    # (e.g. first-layer discriminator weights over black background) rounding-level differences between the two
    # reductions show up at the scale of the learning rate (1e-3); everything else agrees far more closely.
    for name, atol in (("model.safetensors", 1e-4), ("model_1.safetensors", 1e-3)):
        one = load_file(str(tmp_path / "one" / "checkpoint-3" / name))
        two = load_file(str(tmp_path / "two" / "checkpoint-3" / name))
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=atol, msg=f"{name}: {key}")


def test_fp16_gan_with_accumulation_unscales_each_optimizer_by_its_own_scale(tmp_path, monkeypatch):
    """fp16's GradScaler, simulated on the CPU (Accelerate makes one on CUDA only; growth_interval 1 changes the scale
    at every update, as a growth or an overflow's back-off does), is shared by the tokenizer's and the discriminator's
    optimizers: every micro-batch of each must be unscaled by the scale it was scaled by, so that 2 x 2 accumulated
    clips give both optimizers the gradients of one batch of 4."""
    make_accelerator = common.make_accelerator

    def with_scaler(args, accumulation_steps):
        accelerator = make_accelerator(args, accumulation_steps)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
        return accelerator

    gradients, adam_step = [], torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        gradients.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]
                                    if p.grad is not None]))
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(common, "make_accelerator", with_scaler)
    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    args = [*TINY, "--max_steps", "1", "--disc_start_step", "0", "--eval_steps", "0", "--max_grad_norm", "0"]
    main([*args, "--output_dir", str(tmp_path / "batch"), "--train_batch_size", "4"])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    batch, gradients[:] = list(gradients), []
    main([*args, "--output_dir", str(tmp_path / "accumulated"), "--gradient_accumulation_steps", "2"])
    assert len(batch) == len(gradients) == 2  # the tokenizer's step, then the discriminator's
    for one, accumulated in zip(batch, gradients):
        assert (accumulated - one).norm() <= 1e-5 * one.norm()


def test_the_generator_and_discriminator_losses_train_only_their_own_model(tmp_path, monkeypatch):
    """At a GAN step, the gradients each optimizer steps with: the generator's adversarial term (scaled by
    --adversarial_weight) must not reach the discriminator, and the discriminator's loss must not reach the
    tokenizer."""
    gradients, adam_step = [], torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        gradients.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
        return adam_step(self, *args, **kwargs)

    def run(name, *flags):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        gradients.clear()
        main([*TINY, "--max_steps", "1", "--disc_start_step", "0", "--eval_steps", "0", "--max_grad_norm", "0",
              "--num_log_videos", "0", "--output_dir", str(tmp_path / name), *flags])
        assert len(gradients) == 2  # the tokenizer's step, then the discriminator's
        return list(gradients)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    tokenizer, discriminator = run("base")
    louder_generator = run("adversarial", "--adversarial_weight", "10")
    assert not torch.equal(louder_generator[0], tokenizer)
    assert torch.equal(louder_generator[1], discriminator)
    loss = train_tokenizer.discriminator_loss
    monkeypatch.setattr(train_tokenizer, "discriminator_loss", lambda *a, **k: 10 * loss(*a, **k))
    louder_discriminator = run("discriminator")
    assert torch.equal(louder_discriminator[0], tokenizer)
    torch.testing.assert_close(louder_discriminator[1], 10 * discriminator)


def test_presets_set_the_paper_values(tmp_path):
    base = ["--train_data", str(tmp_path), "--output_dir", str(tmp_path), "--max_steps", "500"]
    ucf, k600 = parse_args([*base, "--preset", "ucf"]), parse_args([*base, "--preset", "k600", "--fps", "8"])
    assert (ucf.learning_rate, ucf.global_batch_size, ucf.fps, ucf.perceptual_weight, ucf.adversarial_weight) == (
        5e-5, 256, 8, 0.1, 0.1)
    assert (k600.learning_rate, k600.fps, k600.warmup_steps, k600.lr_schedule) == (1e-4, 8, 5, "linear")


def test_a_preset_run_without_a_perceptual_network_says_it_leaves_that_loss_out(tmp_path, caplog):
    tiny = ["--preset", "ucf", "--global_batch_size", "2", "--max_steps", "1", "--eval_steps", "0",
            "--num_log_videos", "0", "--adversarial_weight", "0"]
    main([*TINY, *tiny, "--output_dir", str(tmp_path / "a")])
    assert "--preset ucf: no perceptual loss without --perceptual_model" in caplog.text
    caplog.clear()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main([*TINY, *tiny, "--output_dir", str(tmp_path / "b"), "--perceptual_model", "test_train_tokenizer:L1Distance"])
    assert "perceptual" not in caplog.text


def test_help_through_the_example_wrapper(monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["train_tokenizer.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "train_tokenizer.py"), run_name="__main__")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--perceptual_model", "--disc_start_step", "--gan_loss", "--fsq_levels", "--patch_size",
                 "--tokenizer_config", "--init_from", "--push_to_hub", "no perceptual weights ship"):
        assert flag in text


def test_a_run_compiled_by_accelerate_trains_like_an_eager_one(tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend ...`: the tokenizer's and the discriminator's forwards are each one graph
    (a graph break fails the run; the input check is a device-side assert there), and the run is the eager one up to
    float rounding."""
    from accelerate.state import AcceleratorState, GradientState

    args = [*TINY, "--max_steps", "3", "--disc_start_step", "1", "--perceptual_weight", "0"]
    eager = main([*args, "--output_dir", str(tmp_path / "eager")])
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")  # dynamo's tracing without inductor's compile time
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_FULLGRAPH", "true")
    AcceleratorState._reset_state(reset_partial_state=True)  # the state (and its dynamo settings) is read anew
    GradientState._reset_state()
    compiled = main([*args, "--output_dir", str(tmp_path / "compiled")])
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert compiled["psnr"] == pytest.approx(eager["psnr"], rel=1e-5)
    a = load_file(str(tmp_path / "eager" / "final" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "final" / "diffusion_pytorch_model.safetensors"))
    # up to float rounding: compiled, the causal padding is a concatenation, whose gradient sums in another order
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


# ---- fine-tuning a pretrained tokenizer (--init_from) ----------------------------------------------------------
def save_tiny_tokenizer(folder, clips: dict | None = None, seed: int = 7) -> NBPVideoTokenizer:
    """TINY's tokenizer with weights of its own (`seed`), saved to `folder` with the training clips `clips`."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(parse_args([*TINY, "--output_dir", str(folder)]))
    tokenizer.save_pretrained(folder)
    if clips is not None:
        write_json(os.path.join(folder, "training_clips.json"), clips)
    return tokenizer


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["tokenizer", "pipeline"])
def test_init_from_starts_from_the_pretrained_weights(tmp_path, layout, capsys):
    """--init_from a tokenizer folder, or a pipeline folder (its video_tokenizer/): the run starts from its weights (a
    learning rate of 0 keeps them to the end) and its training clips (no clip flag given: 5 x 16 x 16, not the
    default 17 x 128 x 128), and final/ names where they came from; a run without it starts from its own."""
    from modeling_nbp import NBPConfig, NBPForVideoGeneration, NBPVideoPipeline

    source = tmp_path / "pretrained"
    pretrained = save_tiny_tokenizer(tmp_path / "tok", {"num_frames": 5, "resolution": 16})
    if layout == "pipeline":
        generator = NBPForVideoGeneration(NBPConfig(latent_shape=[3, 4, 4], block_shape=[1, 4, 4], video_vocab_size=16,
                                                    num_classes=10, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2))
        NBPVideoPipeline(transformer=generator, video_tokenizer=pretrained).save_pretrained(source)
        shutil.copy(tmp_path / "tok" / "training_clips.json", source / "video_tokenizer")
    else:
        shutil.copytree(tmp_path / "tok", source)
    frozen = [*DIGITS, *TRAINING, "--learning_rate", "0", "--max_steps", "1", "--adversarial_weight", "0",
              "--eval_steps", "0", "--num_log_videos", "0"]
    main([*frozen, "--init_from", str(source), "--output_dir", str(tmp_path / "run")])
    final = tmp_path / "run" / "final"
    assert same_weights(load_file(str(final / "diffusion_pytorch_model.safetensors")), pretrained.state_dict())
    assert json.loads((final / "config.json").read_text())["_name_or_path"] == str(source)
    assert json.loads((final / "training_clips.json").read_text()) == {"num_frames": 5, "resolution": 16}
    assert f"parameters from {source}" in capsys.readouterr().out
    main([*frozen, *CLIPS, *SIZE, "--output_dir", str(tmp_path / "new")])
    assert not same_weights(load_file(str(tmp_path / "new" / "final" / "diffusion_pytorch_model.safetensors")),
                            pretrained.state_dict())


def test_a_resume_needs_the_same_init_from(tmp_path):
    """A resumed run takes its weights from the checkpoint; resuming it with another --init_from (or none) is refused
    rather than recorded as a run of that other tokenizer."""
    for name in ("a", "b"):
        save_tiny_tokenizer(tmp_path / name, {"num_frames": 5, "resolution": 16})
    run = [*DIGITS, *TRAINING, "--max_steps", "1", "--adversarial_weight", "0", "--eval_steps", "0",
           "--num_log_videos", "0", "--output_dir", str(tmp_path / "run")]
    main([*run, "--init_from", str(tmp_path / "a")])
    resume = [*run, "--max_steps", "2", "--resume_from_checkpoint", "latest"]
    a, b = repr(str(tmp_path / "a")), repr(str(tmp_path / "b"))
    for flags, change in [(["--init_from", str(tmp_path / "b")], f"init_from {a} on disk, {b} now"),
                          ([*CLIPS, *SIZE], f"init_from {a} on disk, None now")]:
        with pytest.raises(ValueError, match=f"trained with other settings \\({re.escape(change)}\\)"):
            main([*resume, *flags])
    main([*resume, "--init_from", str(tmp_path / "a")])
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


def test_init_from_cannot_be_combined_with_another_model_definition(tmp_path):
    """Checked before the source is resolved (no download): the pretrained tokenizer is the model. A source that is
    not there is reported as --init_from's."""
    base = ["--dataset", "moving_digits", "--output_dir", str(tmp_path), "--init_from", "someone/tokenizer"]
    for flags, given in [(["--fsq_levels", "8,8", "--patch_size", "2"], "--fsq_levels, --patch_size"),
                         (["--patch_size", "1"], "--patch_size"),  # the default value, given: ignored all the same
                         (["--tokenizer_config", "tok.json"], "--tokenizer_config")]:
        with pytest.raises(ValueError, match=re.escape(f"{given} cannot be combined with --init_from, whose pretrained "
                                                       "tokenizer is the model")):
            parse_args([*base, *flags])
    with pytest.raises(FileNotFoundError, match=r"--init_from: tokenizer '\./missing': no folder at"):
        parse_args(["--dataset", "moving_digits", "--output_dir", str(tmp_path), "--init_from", "./missing"])


def test_init_from_takes_the_tokenizers_training_clips_as_the_clip_defaults(tmp_path, caplog):
    """Each clip flag: the command line, else --preset, else the tokenizer's training clips, else the default; a
    value that differs from those training clips is warned about."""
    save_tiny_tokenizer(tmp_path / "tok", {"num_frames": 9, "resolution": 24, "fps": 4, "resize": "crop"})
    clips = lambda args: (args.num_frames, args.resolution, args.fps, args.resize)  # noqa: E731
    folder = ["--train_data", str(tmp_path), "--output_dir", str(tmp_path)]
    fine_tune = [*folder, "--init_from", str(tmp_path / "tok")]
    assert clips(parse_args(fine_tune)) == (9, 24, 4, "crop") and not caplog.text
    assert clips(parse_args([*fine_tune, "--resolution", "32", "--resize", "crop"])) == (9, 32, 4, "crop")
    assert re.search(r"--resolution 32 differs from the clips the --init_from tokenizer was trained on \(resolution 24 "
                     r"in .*training_clips.json\)", caplog.text) and "--resize" not in caplog.text
    caplog.clear()
    assert clips(parse_args([*fine_tune, "--preset", "k600"])) == (17, 128, 16, "crop")  # paper Table 5's clips
    assert "--fps 16 (--preset k600) differs from the clips" in caplog.text
    assert clips(parse_args(folder)) == (17, 128, 8, "squash")  # without --init_from: the defaults
    # moving digits have no frame rate or resizing: the recorded ones are neither taken nor warned about
    caplog.clear()
    digits = parse_args(["--dataset", "moving_digits", "--output_dir", str(tmp_path), "--init_from",
                         str(tmp_path / "tok"), "--preset", "k600"])
    assert clips(digits) == (17, 128, 16, "squash") and "--fps" not in caplog.text and "--resize" not in caplog.text


def test_init_from_a_hub_repo_id(tmp_path, local_hub):
    from huggingface_hub import HfApi

    pretrained = save_tiny_tokenizer(tmp_path / "tok", {"num_frames": 5, "resolution": 16})
    api = HfApi()
    api.create_repo("test-user/tok")
    api.upload_folder(repo_id="test-user/tok", folder_path=tmp_path / "tok")
    args = parse_args([*DIGITS, "--init_from", "test-user/tok", "--output_dir", str(tmp_path / "run")])
    assert (args.init_from, args.num_frames, args.resolution) == ("test-user/tok", 5, 16)
    tokenizer = build_tokenizer(args)
    assert same_weights(tokenizer.state_dict(), pretrained.state_dict())
    assert tokenizer.config._name_or_path == "test-user/tok"  # final/config.json names the repo, not the cache
