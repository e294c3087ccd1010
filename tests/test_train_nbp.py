import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file

from modeling_nbp import NBPConfig, NBPForVideoGeneration, NBPVideoPipeline
from modeling_nbp.data import load_token_dataset
from modeling_nbp.data.pretokenize import TOKEN_FEATURES
from modeling_nbp.training import common, flops
from modeling_nbp.training.optim import lr_at_step
from modeling_nbp.training.train_nbp import build_parser, main, parse_args
from train_helpers import fresh_accelerate_state, read_log, tensorboard_steps  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train_nbp.py")
GRID, VOCAB, CLASSES = (2, 4, 4), 16, 3
TINY = ["--num_layers", "2", "--hidden_size", "32", "--num_heads", "4", "--block_shape", "1,1,4",
        "--dataloader_num_workers", "0", "--report_to", "none", "--logging_steps", "1", "--warmup_steps", "2"]


def write_tokens(path: Path, n: int, seed: int, grid=GRID, class_names=None, classes=CLASSES) -> str:
    """A pre-tokenized folder in the `pretokenize` format: n random (2, 4, 4) grids, labels i % 3."""
    grids = np.random.default_rng(seed).integers(0, VOCAB, (n, *grid)).astype(np.int32)
    rows = {"tokens": list(grids.reshape(n, -1)), "latent_shape": [list(grid)] * n,
            "label": [i % classes for i in range(n)], "index": list(range(n))}
    features = TOKEN_FEATURES
    if class_names:
        features = datasets.Features(dict(TOKEN_FEATURES, label=datasets.ClassLabel(names=class_names)))
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path / "tokens"))
    return str(path)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return write_tokens(root / "train", 24, 0), write_tokens(root / "val", 6, 1)


def subprocess_env() -> dict:
    # same intra-op thread count as this process, so a subprocess computes bit-identical results
    return dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")


# ---- plumbing --------------------------------------------------------------------------------------------------
def test_step_batch_sampler_order_is_independent_of_processes_and_resumes():
    def batches(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = batches(common.StepBatchSampler(10, 4, seed=3), 6)  # 2 steps per epoch (2 items dropped per epoch)
    halves = [batches(common.StepBatchSampler(10, 2, 2, p, seed=3), 6) for p in range(2)]
    assert [a + b for a, b in zip(*halves)] == single
    assert batches(common.StepBatchSampler(10, 4, seed=3, start_step=4), 2) == single[4:]
    for epoch in range(3):
        items = single[2 * epoch] + single[2 * epoch + 1]
        assert len(set(items)) == 8  # no repeats inside an epoch
    assert single[:2] != single[2:4]  # reshuffled each epoch
    assert batches(common.StepBatchSampler(10, 4, seed=4), 2) != single[:2]
    # per-item seeds (a clip's random window): a function of (seed, epoch, item), whatever the split or resume
    seeded = batches(common.StepBatchSampler(10, 4, seed=3, item_seeds=True), 6)
    assert [[i for i, _ in batch] for batch in seeded] == single
    halves = [batches(common.StepBatchSampler(10, 2, 2, p, seed=3, item_seeds=True), 6) for p in range(2)]
    assert [a + b for a, b in zip(*halves)] == seeded
    assert batches(common.StepBatchSampler(10, 4, seed=3, start_step=4, item_seeds=True), 2) == seeded[4:]
    first_epoch = dict(pair for batch in seeded[:2] for pair in batch)
    again = [(first_epoch[i], seed) for batch in seeded[2:4] for i, seed in batch if i in first_epoch]
    assert len(again) >= 6 and all(a != b for a, b in again)  # an item's next epoch is a new draw
    with pytest.raises(ValueError, match="fewer than one global batch"):
        common.StepBatchSampler(3, 2, 2, 0)


def test_an_optimizer_step_takes_the_same_clips_however_the_global_batch_is_split():
    def step_items(batch, accumulation, processes, steps=4):
        iterators = [iter(common.StepBatchSampler(10, batch, processes, p, seed=5, accumulation_steps=accumulation))
                     for p in range(processes)]
        return [sorted(i for _ in range(accumulation) for it in iterators for i in next(it)) for _ in range(steps)]

    reference = step_items(8, 1, 1)  # global batch 8 of 10 items: one step per epoch, 2 items dropped
    for layout in [(4, 2, 1), (2, 2, 2), (4, 1, 2), (1, 4, 2)]:
        assert step_items(*layout) == reference, layout
    assert all(len(set(items)) == 8 for items in reference)  # never a clip twice in one step


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    data = write_tokens(tmp_path / "data", 24, 0)
    common_args = ["--train_data", data, *TINY, "--max_steps", "3", "--dropout", "0", "--max_grad_norm", "0",
                   "--checkpointing_steps", "100"]
    main([*common_args, "--output_dir", str(tmp_path / "large"), "--train_batch_size", "4"])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main([*common_args, "--output_dir", str(tmp_path / "accumulated"), "--train_batch_size", "2",
          "--gradient_accumulation_steps", "2"])
    large = load_file(str(tmp_path / "large" / "final" / "model.safetensors"))
    accumulated = load_file(str(tmp_path / "accumulated" / "final" / "model.safetensors"))
    for name, weight in large.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_a_finished_run_resumed_says_there_is_nothing_to_train(token_data, tmp_path, capsys):
    args = ["--train_data", token_data[0], "--validation_data", token_data[1], *TINY, "--max_steps", "2",
            "--train_batch_size", "4", "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "latest"]
    first = main(args)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    capsys.readouterr()
    summary = main(args)
    out = capsys.readouterr().out
    assert "the checkpoint is at step 2, at or past --max_steps 2: nothing to train" in out
    # the run's last logged loss (was NaN: "n/a" in the output, left out of final/'s model card and the study's table)
    assert f"train loss {first['train_loss']:.4f}" in out and summary["steps"] == 2
    assert summary["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
    # the final validation is made again (a run killed while making it resumes here too) and logged once
    assert [r["step"] for r in read_log(tmp_path / "run") if "val_loss" in r] == [2]
    assert summary["val_loss"] == first["val_loss"]
    # a rerun without --validation_data makes none: the logged one stays (was dropped)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main([a for a in args if a not in ("--validation_data", token_data[1])])
    assert [r["val_loss"] for r in read_log(tmp_path / "run") if "val_loss" in r] == [first["val_loss"]]


def test_batch_layout_from_global_batch():
    assert common.resolve_batch_layout(None, None, None, 4, 8) == (8, 1)
    # a global batch alone: micro-batches up to the default size, the rest accumulated (no surprise OOM)
    assert common.resolve_batch_layout(None, None, 256, 8, 8) == (8, 4)
    assert common.resolve_batch_layout(None, None, 256, 1, 8) == (8, 32)
    assert common.resolve_batch_layout(None, None, 12, 1, 8) == (6, 2)
    assert common.resolve_batch_layout(None, None, 4, 2, 8) == (2, 1)
    with pytest.raises(ValueError, match="global_batch_size"):
        common.resolve_batch_layout(None, None, 10, 4, 8)
    assert common.resolve_batch_layout(4, None, 256, 8, 8) == (4, 8)  # the official UCF run: 4 per GPU x 64 GPUs
    assert common.resolve_batch_layout(None, 2, 64, 4, 8) == (8, 2)
    with pytest.raises(ValueError, match="global_batch_size"):
        common.resolve_batch_layout(3, None, 64, 4, 8)


def test_batch_and_checkpoint_flags_must_be_positive(capsys):
    for flag in ("--train_batch_size", "--gradient_accumulation_steps", "--global_batch_size",
                 "--checkpoints_total_limit", "--checkpointing_steps", "--logging_steps",
                 # 0 would otherwise stand for "not given" (the data's classes, the default size)
                 "--num_classes", "--num_layers", "--hidden_size", "--num_heads", "--video_vocab_size",
                 "--lr_schedule_steps"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--train_data", "x", flag, "0"])
        assert f"argument {flag}: expected an integer >= 1, got '0'" in capsys.readouterr().err
    for flag in ("--validation_steps", "--sample_steps"):  # 0: off; a negative interval ran at every step
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--train_data", "x", f"{flag}=-1"])
        assert f"argument {flag}: expected an integer >= 0, got '-1'" in capsys.readouterr().err


def test_warmup_longer_than_the_schedule_is_refused():
    with pytest.raises(ValueError, match="--warmup_steps 5000 \\(with --preset ucf-700m\\) must lie in \\[0, 1000\\]"):
        parse_args(["--train_data", "x", "--output_dir", "y", "--preset", "ucf-700m", "--max_steps", "1000"])


def test_clipping_and_schedule_values_are_checked():
    base = ["--train_data", "x", "--output_dir", "y"]
    for flags, message in [(["--max_grad_norm=-1"], "--max_grad_norm must be >= 0 (0: no clipping), got -1.0"),
                           (["--warmup_lr_init=-1e-3"], "--warmup_lr_init must be >= 0, got -0.001"),
                           (["--lr_min", "1e-3"], "--lr_min must lie in [0, --learning_rate 0.0003], got 0.001"),
                           (["--lr_min=-1e-5"], "--lr_min must lie in [0, --learning_rate 0.0003], got -1e-05")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_args([*base, *flags])
    args = parse_args([*base, "--max_grad_norm", "0", "--lr_min", "3e-4"])  # no clipping; a constant rate
    assert (args.max_grad_norm, args.lr_min) == (0, 3e-4)


def test_deepspeed_clips_at_max_grad_norm(monkeypatch):
    """DeepSpeed clips in its engine at the config's gradient_clipping, which Accelerate fills from "auto" with 1.0:
    --max_grad_norm must reach it, and a config that says otherwise is refused rather than silently applied."""
    from accelerate.utils import DeepSpeedPlugin

    from modeling_nbp.training.train_nbp import configure_deepspeed

    monkeypatch.delenv("ACCELERATE_GRADIENT_CLIPPING", raising=False)
    for norm in (0.0, 0.5, 1.0):
        config = DeepSpeedPlugin().deepspeed_config  # an `accelerate config` without gradient_clipping: "auto"
        configure_deepspeed(config, 4, norm)
        assert (config["gradient_clipping"], config["train_micro_batch_size_per_gpu"]) == (norm, 4)
    config = DeepSpeedPlugin(gradient_clipping=1.0).deepspeed_config  # the examples' configs
    configure_deepspeed(config, 4, 1.0)
    assert config["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="--max_grad_norm 0.5 differs from the DeepSpeed config's gradient_clipping "
                                         "1.0, which DeepSpeed applies instead"):
        configure_deepspeed(config, 4, 0.5)


def test_mixed_precision_follows_the_device(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(ValueError, match="--mixed_precision fp16 needs a GPU: on the CPU"):  # accelerate ignores it
        main(["--train_data", "x", "--output_dir", str(tmp_path), "--cpu", "--mixed_precision", "fp16"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert common.resolve_mixed_precision("auto") == "bf16"
    assert common.resolve_mixed_precision("auto", cpu=True) == "no"  # as on a machine without CUDA
    assert common.resolve_mixed_precision("fp16") == "fp16"


def test_a_run_never_mixes_with_another_runs_checkpoints(tmp_path):
    def make(step):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / common.CHECKPOINT_MARKER).write_text(json.dumps({"global_step": step}))

    for step in (40, 50):
        make(step)
    with pytest.raises(ValueError, match="checkpoints of an earlier run \\(checkpoint-40, checkpoint-50\\).*"
                                         "--overwrite_output_dir"):
        common.check_run_start(str(tmp_path), None, overwrite=False, is_main_process=True)
    older = str(tmp_path / "checkpoint-40")
    with pytest.raises(ValueError, match="newer than the resumed step 40 \\(checkpoint-50\\)"):
        common.check_run_start(str(tmp_path), older, overwrite=False, is_main_process=True)
    common.check_run_start(str(tmp_path), str(tmp_path / "checkpoint-50"), overwrite=False, is_main_process=True)
    common.check_run_start(str(tmp_path), older, overwrite=True, is_main_process=True)
    assert [s for s, _ in common.list_checkpoints(tmp_path)] == [40]
    (tmp_path / "samples" / "step-0000040").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    common.check_run_start(str(tmp_path), None, overwrite=True, is_main_process=True)
    assert common.list_checkpoints(tmp_path) == [] and not (tmp_path / "samples").exists()
    assert not (tmp_path / "logs").exists()


def test_latest_checkpoint_skips_incomplete_folders(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        if complete:
            (folder / common.CHECKPOINT_MARKER).write_text("{}")
    (tmp_path / ".tmp-checkpoint-20").mkdir()  # a save cut short by a crash
    assert common.find_latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert common.resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-10")
    assert common.resolve_resume_checkpoint(str(tmp_path / "empty"), "latest") is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        common.resolve_resume_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-15"))


def test_what_a_killed_run_was_writing_is_deleted_when_it_is_rerun(tmp_path):
    """A run killed while writing final/ (a model's size) or rewriting its log leaves `atomic_output_path`'s temporary
    copies: deleted before the rerun, as are half checkpoints, except an earlier final/ that a kill left set aside
    before the new one took its place (the only copy then)."""
    for name in (".tmp-checkpoint-20", ".deleting-0a1b2c3d", ".final.tmp-123-0a1b2c3d", ".final.old-0a1b2c3d"):
        (tmp_path / name).mkdir()
    (tmp_path / ".train_log.tmp-123-0a1b2c3d.jsonl").write_text('{"step": 1}')
    common.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == [".final.old-0a1b2c3d"]
    (tmp_path / "final").mkdir()  # the new final/ took its place: the set-aside one is stale
    common.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["final"]


def test_save_checkpoint_is_atomic_and_rotates(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    for step in (1, 2, 3):
        common.save_checkpoint(accelerator, str(tmp_path), step, {"seed": 0}, {"ema": {"w": torch.ones(2)}},
                               total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]  # no temporaries left over
    state = common.load_checkpoint(accelerator, str(tmp_path / "checkpoint-3"))
    assert state == {"seed": 0, "global_step": 3}
    assert torch.equal(common.load_checkpoint_tensors(str(tmp_path / "checkpoint-3"), "ema")["w"], torch.ones(2))
    del model


@pytest.mark.parametrize("name, damage", [("model.safetensors", "cut"), ("optimizer.bin", "cut"),
                                          ("optimizer.bin", "empty")])
def test_a_damaged_checkpoint_is_named_as_such(tmp_path, name, damage):
    """A checkpoint file damaged after it was written (a disk or network filesystem failing) is a clear error that
    says so and how to resume from the checkpoint before (was a raw SafetensorError, or "another model")."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    path = common.save_checkpoint(accelerator, str(tmp_path), 1, {})
    damaged = Path(path) / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2] if damage == "cut" else b"")
    with pytest.raises(ValueError, match=f"{re.escape(path)} could not be loaded .*a damaged file \\(delete "
                                         "checkpoint-1 to resume from the checkpoint before it\\)"):
        common.load_checkpoint(accelerator, path)
    del model, optimizer


def test_an_unreadable_checkpoint_file_is_not_called_damaged(tmp_path, monkeypatch):
    """A file that cannot be read now (permissions, a filesystem error) keeps its own error: the advice to delete a
    damaged checkpoint would throw away a sound one."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    path = common.save_checkpoint(accelerator, str(tmp_path), 1, {})
    real_open = open

    def deny(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr("builtins.open", lambda file, *a, **k: (deny if str(file).endswith(".bin") else real_open)(
        file, *a, **k))
    monkeypatch.setattr(common, "load_file", deny)
    # were "could not be loaded ... a damaged file (delete checkpoint-1 ...)"
    with pytest.raises(PermissionError, match="optimizer.bin"):
        common.load_checkpoint(accelerator, path)
    with pytest.raises(PermissionError, match="ema.safetensors"):
        common.load_checkpoint_tensors(path, "ema")
    del model, optimizer


def test_a_damaged_ema_file_is_named_as_such(tmp_path):
    save_file({"w": torch.zeros(4)}, str(tmp_path / "ema.safetensors"))
    (tmp_path / "ema.safetensors").write_bytes((tmp_path / "ema.safetensors").read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"ema.safetensors could not be loaded .*damaged file \\(delete "
                                         f"{tmp_path.name}"):
        common.load_checkpoint_tensors(str(tmp_path), "ema")  # was a raw SafetensorError


def test_a_resume_with_other_accumulation_steps_updates_at_its_step_boundaries(tmp_path):
    """Same global batch on another number of processes -> other accumulation steps. The checkpoint's micro-step
    count (3 steps without accumulation) must not shift the resumed run's updates off its step boundaries."""
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    for _ in range(3):
        with accelerator.accumulate(model):
            pass
    common.save_checkpoint(accelerator, str(tmp_path), 3, {})
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    common.load_checkpoint(accelerator, str(tmp_path / "checkpoint-3"))
    updates = []
    for _ in range(4):
        with accelerator.accumulate(model):
            updates.append(accelerator.sync_gradients)
    assert updates == [False, True, False, True]


def test_flops_and_mfu_estimates():
    D, L = 32, 2
    config = NBPConfig(latent_shape=list(GRID), block_shape=[1, 1, 4], video_vocab_size=VOCAB, num_classes=CLASSES,
                       first_block="hybrid", hidden_size=D, num_hidden_layers=L, num_attention_heads=4)
    assert config.vocab_size == 4 + CLASSES + VOCAB  # BOV + 3 placeholders, one id per class, video ids
    net = NBPForVideoGeneration(config)
    # per layer q, k, v, o (D x D each) and the MLP (D x 4D twice), plus the output head
    assert flops.matmul_parameters(net) == L * 12 * D * D + D * config.vocab_size
    assert flops.training_flops_per_token(1000, 2, 32, 10) == 6 * 1000 + 12 * 2 * 32 * 10
    assert flops.estimate_mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
    assert np.isnan(flops.estimate_mfu(1000.0, 1e9, 2, None))
    assert flops.peak_flops(torch.device("cpu")) is None and flops.peak_flops(torch.device("cpu"), 100) == 1e14


def test_help_through_the_example_wrapper(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_nbp.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--train_data", "--preset", "--optimizer_recipe", "--resume_from_checkpoint", "--ema_decay",
                 "--class_dropout_prob", "--push_to_hub", "--global_batch_size"):
        assert flag in text
    assert "ucf-700m" in build_parser().format_help()


def test_bad_arguments_are_clear_errors(token_data, tmp_path):
    for flag, given in (("--train_data", [str(tmp_path / "gone")]), ("--validation_data", [token_data[0]])):
        with pytest.raises(FileNotFoundError, match=f"^{flag}: no folder at .*gone$"):  # was datasets' message
            main(["--train_data", *given, "--validation_data", str(tmp_path / "gone"), "--output_dir", str(tmp_path),
                  *TINY])
    with pytest.raises(ValueError, match="hub_model_id"):
        main(["--train_data", token_data[0], "--output_dir", str(tmp_path), "--push_to_hub"])
    with pytest.raises(ValueError, match="--num_layers cannot be combined with --preset"):
        main(["--train_data", token_data[0], "--output_dir", str(tmp_path), "--preset", "ucf-700m",
              "--num_layers", "2"])
    with pytest.raises(ValueError, match="labels in \\[0, 2\\], the model 2 classes"):
        main(["--train_data", token_data[0], "--output_dir", str(tmp_path), "--num_classes", "2", *TINY])
    # sampling flags are checked before training: guidance needs class dropout, values their ranges
    with pytest.raises(ValueError, match="guidance_scale != 1 needs a condition prefix trained with --class_dropout"):
        main(["--train_data", token_data[0], "--output_dir", str(tmp_path), "--guidance_scale", "3", *TINY])
    with pytest.raises(ValueError, match="top_p must be a number in"):
        main(["--train_data", token_data[0], "--output_dir", str(tmp_path), "--top_p", "0", *TINY])
    with pytest.raises(ValueError, match="--attn_implementation flex_attention trains on CUDA only"):
        main(["--train_data", token_data[0], "--output_dir", str(tmp_path), "--attn_implementation", "flex_attention",
              *TINY])
    unlabelled = write_tokens(tmp_path / "unlabelled", 4, 2, classes=1)
    rows = load_token_dataset(unlabelled).tokens.map(lambda row: {"label": -1})
    rows.save_to_disk(str(tmp_path / "unlabelled2" / "tokens"))
    with pytest.raises(ValueError, match="--condition_mode class needs a label for every clip; --train_data .*"
                                         "unlabelled2 holds unlabelled clips"):  # was NBPConfig's num_classes error
        main(["--train_data", str(tmp_path / "unlabelled2"), "--output_dir", str(tmp_path), "--condition_mode", "class",
              *TINY])
    # the validation data must fit the model before training starts (not at the final validation)
    other_grid = write_tokens(tmp_path / "grid", 4, 2, grid=(2, 2, 4))
    with pytest.raises(ValueError, match="--validation_data has latent grids \\[2, 2, 4\\], --train_data \\[2, 4, 4\\]"):
        main(["--train_data", token_data[0], "--validation_data", other_grid, "--output_dir", str(tmp_path), *TINY])
    named = write_tokens(tmp_path / "named", 6, 2, class_names=["cat", "dog", "fox"])
    shifted = write_tokens(tmp_path / "shifted", 6, 3, class_names=["cat", "fox", "owl"])
    with pytest.raises(ValueError, match="--validation_data has classes that --train_data lacks \\(\\['owl'\\]\\)"):
        main(["--train_data", named, "--validation_data", shifted, "--output_dir", str(tmp_path), *TINY])
    more_classes = write_tokens(tmp_path / "classes", 8, 4, classes=4)
    with pytest.raises(ValueError, match="--validation_data has labels in \\[0, 3\\], the model 3 classes"):
        main(["--train_data", token_data[0], "--validation_data", more_classes, "--output_dir", str(tmp_path), *TINY])


def test_a_validation_folder_with_some_of_the_classes_is_scored_with_the_training_labels(tmp_path):
    """A small validation folder holds clips of some classes only, so its class list is shorter and its labels are
    positions in that list: each must be scored as the training class of the same name."""
    train = write_tokens(tmp_path / "train", 6, 0, class_names=["cat", "dog", "fox"])
    val = write_tokens(tmp_path / "val", 1, 1, class_names=["fox"], classes=1)  # one clip, label 0 = fox
    summary = main(["--train_data", train, "--validation_data", val, "--output_dir", str(tmp_path / "run"), *TINY,
                    "--max_steps", "1", "--train_batch_size", "2", "--warmup_steps", "0"])
    model = NBPForVideoGeneration.from_pretrained(tmp_path / "run" / "final").eval()
    grid = load_token_dataset(val)[0]["input_ids"][None]
    with torch.no_grad():
        as_fox = model(video_ids=grid, class_labels=torch.tensor([2])).loss.item()
    assert summary["val_loss"] == pytest.approx(as_fox, rel=1e-5)


def test_class_count_comes_from_the_class_names(tmp_path):
    # a class with no items left (every video skipped) is still a class of the model
    data = write_tokens(tmp_path / "data", 6, 0, class_names=["cat", "dog", "fox", "owl"])
    Path(data, "pretokenize.json").write_text(json.dumps({"clip": {"fps": 12.5}}))  # as nbp pretokenize records it
    main(["--train_data", data, "--output_dir", str(tmp_path / "run"), *TINY, "--max_steps", "1",
          "--train_batch_size", "2", "--warmup_steps", "0"])
    config = NBPConfig.from_pretrained(tmp_path / "run" / "final")
    assert config.num_classes == 4 and config.id2label == {0: "cat", 1: "dog", 2: "fox", 3: "owl"}
    assert config.fps == 12.5  # the clips' rate, which nbp generate then works at


def test_each_epoch_trains_on_a_new_window_of_every_video(tmp_path, monkeypatch, capsys):
    from modeling_nbp.training import train_nbp

    # 4 videos x 3 windows; every token of window w of video v is 3 * v + w, so a grid tells which window it is
    rows = {"tokens": [[3 * v + w] * 32 for v in range(4) for w in range(3)], "latent_shape": [list(GRID)] * 12,
            "label": [v % CLASSES for v in range(4) for _ in range(3)],
            "index": [v for v in range(4) for _ in range(3)], "window": [w for _ in range(4) for w in range(3)]}
    features = datasets.Features(dict(TOKEN_FEATURES, window=datasets.Value("int32")))
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "data" / "tokens"))
    seen, collate = [], train_nbp.collate_tokens

    def recording(items):
        seen.append(sorted(int(item["input_ids"].flatten()[0]) for item in items))
        return collate(items)

    monkeypatch.setattr(train_nbp, "collate_tokens", recording)
    main(["--train_data", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), *TINY, "--max_steps", "4",
          "--train_batch_size", "4", "--warmup_steps", "0", "--video_vocab_size", "16"])
    assert "4 videos in 12 pre-tokenized windows: each epoch draws one window of every video" in capsys.readouterr().out
    epochs = seen[:4]  # a step is an epoch: one window of each video
    assert all([t // 3 for t in epoch] == [0, 1, 2, 3] for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1


def test_a_tokenizer_that_did_not_make_the_tokens_is_refused(tmp_path):
    from modeling_nbp.data.pretokenize import weights_digest
    from modeling_nbp.training.train_nbp import check_tokenizer_made_tokens

    made, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    (tmp_path / "tokens").mkdir()
    record = tmp_path / "pretokenize.json"
    record.write_text(json.dumps({"tokenizer_weights": weights_digest(made)}))
    for path in (tmp_path, tmp_path / "tokens"):  # the pretokenize folder or its tokens folder
        check_tokenizer_made_tokens(str(path), made)
        with pytest.raises(ValueError, match=f"--tokenizer is not the tokenizer that made --train_data: its weights "
                                             f"digest is {weights_digest(other)}, {re.escape(str(record))} records "
                                             f"{weights_digest(made)};.* Pass the tokenizer that made the tokens, or "
                                             "pre-tokenize the videos again with this one"):
            check_tokenizer_made_tokens(str(path), other)
    record.write_text(json.dumps({"clip": {"fps": 8}}))  # no digest recorded: nothing to check
    check_tokenizer_made_tokens(str(tmp_path), other)
    record.unlink()
    check_tokenizer_made_tokens(str(tmp_path), other)


def test_a_run_with_a_tokenizer_that_did_not_make_the_tokens_stops_before_training(tmp_path):
    from modeling_nbp.data.pretokenize import weights_digest
    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    tiny = dict(block_out_channels=(8, 8), layers_per_block=(1, 1), downsample_strides=((2, 2),), fsq_levels=(4, 4),
                norm_num_groups=4, patch_size=2)
    torch.manual_seed(0)
    NBPVideoTokenizer(**tiny).save_pretrained(tmp_path / "tokenizer")
    data = write_tokens(tmp_path / "data", 4, 0)
    made = {"tokenizer_weights": weights_digest(NBPVideoTokenizer(**tiny))}  # another initialisation
    Path(data, "pretokenize.json").write_text(json.dumps(made))
    with pytest.raises(ValueError, match="--tokenizer is not the tokenizer that made --train_data"):
        main(["--train_data", data, "--output_dir", str(tmp_path / "run"), *TINY, "--max_steps", "1",
              "--train_batch_size", "2", "--warmup_steps", "0", "--tokenizer", str(tmp_path / "tokenizer")])
    assert not (tmp_path / "run").exists()  # refused before the output folder (or a Hub repository) is made


def test_validation_data_made_by_another_tokenizer_or_other_clips_is_refused(tmp_path):
    clip = {"num_frames": 3, "resolution": 16, "fps": 8.0, "resize": "squash", "sampling": "center"}
    made = {"tokenizer": "NBPVideoTokenizer", "tokenizer_config": {"fsq_levels": [4, 4], "patch_size": 2},
            "tokenizer_weights": "aaaa", "clip": clip}

    def folder(name, record=None):
        path = write_tokens(tmp_path / name, 4, len(name))
        if record is not None:
            Path(path, "pretokenize.json").write_text(json.dumps(record))
        return path

    def run(val):
        main(["--train_data", train, "--validation_data", val, "--output_dir", str(tmp_path / "run"), *TINY,
              "--max_steps", "1", "--train_batch_size", "2", "--warmup_steps", "0", "--overwrite_output_dir"])

    train = folder("train", made)
    other = folder("weights", dict(made, tokenizer_weights="bbbb"))
    folders = f"--validation_data {re.escape(other)} and --train_data {re.escape(train)}"
    with pytest.raises(ValueError, match=f"{folders} were pre-tokenized by different tokenizers \\(validation vs "
                                         "training: tokenizer_weights 'bbbb' vs 'aaaa'\\).*pre-tokenize both with the "
                                         "same tokenizer"):
        run(other)
    other = folder("config", dict(made, tokenizer_config={"fsq_levels": [4, 4], "patch_size": 4}))
    with pytest.raises(ValueError, match="different tokenizers \\(validation vs training: tokenizer_config.patch_size "
                                         "4 vs 2\\)"):
        run(other)
    other = folder("clips", dict(made, clip=dict(clip, fps=16.0, resize="crop", sampling="random")))
    folders = f"--validation_data {re.escape(other)} and --train_data {re.escape(train)}"
    with pytest.raises(ValueError, match=f"{folders} hold clips made with different settings \\(validation vs "
                                         "training: fps 16.0 vs 8.0; resize 'crop' vs 'squash'\\): pre-tokenize both "
                                         "with the same clip settings"):
        run(other)
    cropped = {k: v for k, v in clip.items() if k != "resize"}  # recorded before --resize existed: cropped
    with pytest.raises(ValueError, match="validation vs training: resize 'crop' vs 'squash'"):
        run(folder("before_resize", dict(made, clip=cropped)))
    # the same tokenizer and clips (sampled otherwise), records without these entries, folders without records: run
    run(folder("same", dict(made, clip=dict(clip, sampling="random"))))
    run(folder("partial", {"clip": {"fps": 8.0}}))
    run(folder("plain"))


# ---- training runs ---------------------------------------------------------------------------------------------
def test_two_process_ddp_matches_one_process(token_data, tmp_path):
    # the validation loss is each process's share of the 6 clips, gathered
    args = ["--train_data", token_data[0], "--validation_data", token_data[1], *TINY, "--max_steps", "4", "--dropout",
            "0", "--checkpointing_steps", "100"]
    main([*args, "--output_dir", str(tmp_path / "one"), "--train_batch_size", "4"])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, *args,
               "--output_dir", str(tmp_path / "two"), "--train_batch_size", "2"]
    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 4 steps") == 1  # one run of two processes, reported once
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    losses = lambda run, key="loss": [r[key] for r in read_log(tmp_path / run) if key in r]  # noqa: E731
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
    assert len(losses("two", "val_loss")) == 1 and losses("two", "val_loss") == pytest.approx(losses("one", "val_loss"))


def test_killed_run_resumes_with_identical_losses(token_data, tmp_path, capsys):
    args = ["--train_data", token_data[0], "--validation_data", token_data[1], *TINY, "--max_steps", "24",
            "--train_batch_size", "4", "--checkpointing_steps", "4", "--checkpoints_total_limit", "2",
            "--class_dropout_prob", "0.2", "--ema_decay", "0.9", "--seed", "7", "--validation_steps", "8"]
    reference = tmp_path / "reference"
    summary = main([*args, "--output_dir", str(reference)])
    assert summary["steps"] == 24 and np.isfinite(summary["val_loss"]) and summary["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "done: 24 steps" in out and "val loss" in out and "tokens/s" in out
    assert sorted(p for p in os.listdir(reference) if p.startswith("checkpoint-")) == ["checkpoint-20", "checkpoint-24"]
    assert [r["step"] for r in read_log(reference) if "val_loss" in r] == [8, 16, 24]
    reloaded = NBPForVideoGeneration.from_pretrained(reference / "final")
    assert reloaded.config.latent_shape == list(GRID) and reloaded.config.num_classes == CLASSES

    # the same run, killed with SIGKILL once a checkpoint exists
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen([sys.executable, SCRIPT, *args, "--output_dir", str(killed)], env=subprocess_env(),
                                stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not common.list_checkpoints(killed):  # any complete one (rotation may already have removed the first)
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "final").exists(), "the run finished before it was killed; the test needs a longer run"
    for name in os.listdir(killed):  # a visible checkpoint folder is always complete
        if name.startswith("checkpoint-"):
            assert (killed / name / common.CHECKPOINT_MARKER).exists()
    # a half-written checkpoint (no marker) and a leftover temporary must never be picked up
    (killed / "checkpoint-9999").mkdir()
    (killed / "checkpoint-9999" / "model.safetensors").write_bytes(b"garbage")
    (killed / ".tmp-checkpoint-10000").mkdir()
    latest_step = common.list_checkpoints(killed)[-1][0]
    assert 4 <= latest_step < 24
    with open(killed / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a line cut short by the kill: dropped, not fatal
    # what the checkpoint restores (optimizer, EMA, data order) cannot change on a resume
    for flags, change in [(["--learning_rate", "1e-4"], "optimization.learning_rate 0.0003 on disk, 0.0001 now"),
                          (["--ema_decay", "0"], "optimization.ema_decay 0.9 on disk, 0.0 now"),
                          (["--seed", "8"], "seed 7 on disk, 8 now"),
                          (["--class_dropout_prob", "0"], "model.class_dropout_prob 0.2 on disk, 0.0 now"),
                          (["--hidden_size", "64"], "model.hidden_size 32 on disk, 64 now; model.intermediate_size 128 on disk, 256 now")]:
        with pytest.raises(ValueError, match=f"trained with other settings \\({re.escape(change)}\\)"):
            main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest", *flags])
    # a checkpoint from before the model was kept in it: another model is still named clearly
    marker = killed / f"checkpoint-{latest_step}" / common.CHECKPOINT_MARKER
    kept = marker.read_text()
    marker.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k != "model"}))
    with pytest.raises(ValueError, match="holds another model or optimizer than this run builds"):
        main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest", "--hidden_size", "64"])
    marker.write_text(kept)
    # a file the accelerator loads is missing (fp16's scaler.pt after a bf16 run, say): named, not a raw traceback
    optimizer = killed / f"checkpoint-{latest_step}" / "optimizer.bin"
    optimizer.rename(optimizer.with_suffix(".moved"))
    with pytest.raises(ValueError, match="lacks optimizer.bin, which this run loads"):
        main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    optimizer.with_suffix(".moved").rename(optimizer)

    summary = main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    assert f"resumed from {killed / f'checkpoint-{latest_step}'} at step {latest_step}" in capsys.readouterr().out
    assert summary["steps"] == 24
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rs]  # noqa: E731
    assert strip(read_log(killed)) == strip(read_log(reference))  # every step's loss and lr, and the val loss
    final_a = load_file(str(reference / "final" / "model.safetensors"))
    final_b = load_file(str(killed / "final" / "model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)  # EMA weights included
    assert not (killed / ".tmp-checkpoint-10000").exists()


def test_tensorboard_shows_each_step_once_after_a_resume(token_data, tmp_path):
    """A run killed after logging step 3 but before checkpointing it resumes from step 2 and logs step 3 again:
    TensorBoard must drop the killed run's step 3 (as train_log.jsonl does), not show both."""
    args = ["--train_data", token_data[0], *TINY, "--max_steps", "3", "--train_batch_size", "4",
            "--checkpointing_steps", "2", "--report_to", "tensorboard", "--output_dir", str(tmp_path),
            "--resume_from_checkpoint", "latest"]
    main(args)
    shutil.rmtree(tmp_path / "checkpoint-3")  # killed before it was saved
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main(args)
    assert tensorboard_steps(tmp_path / "logs" / "nbp", "train/loss") == [1, 2, 3]
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


def test_a_resume_raising_max_steps_keeps_the_checkpoints_warmup(token_data, tmp_path):
    """--warmup_steps left to its default (5% of --max_steps) on a resume: the checkpoint's warmup (0) is kept, so a
    larger --max_steps (20, whose 5% is 1 step) is not refused as a change of warmup."""
    args = ["--train_data", token_data[0], *TINY[:-2], "--train_batch_size", "4", "--resume_from_checkpoint", "latest",
            "--output_dir", str(tmp_path), "--checkpointing_steps", "100"]
    main([*args, "--max_steps", "1", "--warmup_steps", "0"])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main([*args, "--max_steps", "20"])
    rates = [r["lr"] for r in read_log(tmp_path)]
    assert rates == pytest.approx([lr_at_step(step, 3e-4, 1, 0) for step in range(1)]
                                  + [lr_at_step(step, 3e-4, 20, 0) for step in range(1, 20)], rel=1e-12)


def test_with_ema_the_validation_loss_is_that_of_the_saved_ema_weights(token_data, tmp_path):
    """final/ holds the EMA weights: the validation loss reported (summary, log, model card) is theirs, as diffusers'
    examples validate with the EMA weights, and the training model gets its own weights back."""
    summary = main(["--train_data", token_data[0], "--validation_data", token_data[1], *TINY, "--max_steps", "2",
                    "--train_batch_size", "4", "--ema_decay", "0.5", "--output_dir", str(tmp_path)])
    final = NBPForVideoGeneration.from_pretrained(tmp_path / "final").eval()
    items = load_token_dataset(token_data[1])
    with torch.no_grad():
        loss = final(video_ids=torch.stack([it["input_ids"] for it in items]),
                     class_labels=torch.tensor([it["label"] for it in items])).loss.item()
    assert summary["val_loss"] == pytest.approx(loss, rel=1e-5)
    net = torch.nn.Linear(3, 2)
    ema = common.EMA(net, 0.5)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped_into(net):
        assert torch.equal(net.weight, ema.shadow["weight"]) and torch.equal(net.bias, own["bias"])
        assert not torch.equal(net.weight, trained["weight"])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items())


def test_a_resume_may_raise_max_steps_but_not_change_the_data_or_schedule(token_data, tmp_path):
    """A finished run extended by a larger --max_steps: its cosine stretches to the new length from the resumed step
    on, although the checkpoint's optimizer holds the old schedule's rate; --lr_schedule_steps keeps the first
    run's length instead. Another training set (the same one moved is fine) or schedule shape is refused."""
    args = ["--train_data", token_data[0], *TINY, "--train_batch_size", "4", "--resume_from_checkpoint", "latest"]
    main([*args, "--max_steps", "4", "--output_dir", str(tmp_path / "stretched")])
    shutil.copytree(tmp_path / "stretched", tmp_path / "kept")
    for flags, change in [(["--train_data", token_data[1]], "data.fingerprint"),
                          (["--lr_schedule", "linear"], "schedule.lr_schedule 'cosine' on disk, 'linear' now"),
                          (["--warmup_steps", "1"], "schedule.warmup_steps 2 on disk, 1 now"),
                          (["--lr_min", "1e-5"], "schedule.lr_min 0.0 on disk, 1e-05 now"),
                          (["--warmup_lr_init", "1e-5"], "schedule.warmup_lr_init 0.0 on disk, 1e-05 now")]:
        with pytest.raises(ValueError, match=f"trained with other settings \\({re.escape(change)}"):
            main([*args, "--max_steps", "8", "--output_dir", str(tmp_path / "stretched"), *flags])
    moved = str(shutil.copytree(token_data[0], tmp_path / "moved"))  # the same tokens at another path: accepted
    for run, flags, length in (("stretched", ["--train_data", moved], 8), ("kept", ["--lr_schedule_steps", "4"], 4)):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        main([*args, "--max_steps", "8", "--output_dir", str(tmp_path / run), *flags])
        rates = [r["lr"] for r in read_log(tmp_path / run) if r["step"] > 4]
        assert rates == pytest.approx([lr_at_step(step, 3e-4, length, 2) for step in range(4, 8)], rel=1e-12)


def test_samples_pipeline_folder_and_push_to_hub(token_data, tmp_path, local_hub, monkeypatch):
    from huggingface_hub import HfApi

    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    torch.manual_seed(0)  # 16 FSQ codes = the data's vocabulary; 3 frames x 16 x 16 pixels <-> a 2 x 4 x 4 grid
    tokenizer = NBPVideoTokenizer(block_out_channels=(8, 8), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                                  fsq_levels=(4, 4), norm_num_groups=4, patch_size=2)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "training_clips.json").write_text('{"num_frames": 3, "resolution": 16}')
    out = tmp_path / "run"
    sampled = []
    log_videos = common.log_videos
    monkeypatch.setattr(common, "log_videos", lambda *a, **k: sampled.append(a[3]) or log_videos(*a, **k))
    main(["--train_data", token_data[0], *TINY, "--max_steps", "2", "--train_batch_size", "4", "--output_dir", str(out),
          "--tokenizer", str(tmp_path / "tokenizer"), "--sample_steps", "1", "--num_samples", "2",
          "--class_dropout_prob", "0.1", "--guidance_scale", "2", "--top_k", "5",
          "--push_to_hub", "--hub_model_id", "test-user/tiny-nbp"])
    assert sampled == [1, 2]  # the last step's samples once, though --sample_steps divides --max_steps
    for step in (1, 2):
        names = os.listdir(out / "samples" / f"step-{step:07d}")
        assert {"samples_0.mp4", "samples_1.mp4", "samples.png"} <= set(names)
    final = out / "final"  # a pipeline folder; its tokenizer's training clips for `nbp pretokenize --tokenizer final`
    assert (final / "video_tokenizer" / "training_clips.json").read_text() == '{"num_frames": 3, "resolution": 16}'
    pipe = NBPVideoPipeline.from_pretrained(final)
    assert pipe.transformer.config.video_vocab_size == VOCAB
    assert pipe.video_tokenizer.codebook_size == VOCAB
    card = (final / "README.md").read_text()
    assert 'from_pretrained("test-user/tiny-nbp")' in card and "for 2 steps of 4 clips" in card
    saved = pipe.transformer.generation_config  # the run's sampling flags are the pipeline's default sampling
    assert (saved.guidance_scale, saved.top_k, saved.top_p, saved.do_sample) == (2.0, 5, None, True)
    pushed = set(HfApi().list_repo_files("test-user/tiny-nbp"))
    local = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()}
    assert local <= pushed


def test_push_to_hub_without_a_reachable_hub_fails_before_training(token_data, tmp_path, monkeypatch):
    from hub_server import forget_hub_clients, use_local_hub

    use_local_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf_home")  # nothing listens there
    try:
        with pytest.raises(RuntimeError, match="--push_to_hub: could not create the Hub repository 'me/tiny' before "
                                               "training \\(.*Error.*\\): check the network and your Hub login"):
            main(["--train_data", token_data[0], *TINY, "--output_dir", str(tmp_path / "run"), "--push_to_hub",
                  "--hub_model_id", "me/tiny"])
    finally:
        forget_hub_clients()
    assert os.listdir(tmp_path / "run") == []  # nothing trained


# ---- accelerate configs (dry run: FSDP and DeepSpeed cannot run on this CPU-only machine) ------------------------
CONFIGS = {  # file -> (distributed type, processes, machines, mixed precision)
    "cpu": ("NO", 1, 1, "no"), "single_gpu": ("NO", 1, 1, "bf16"), "multi_gpu": ("MULTI_GPU", 8, 1, "bf16"),
    "multi_node": ("MULTI_GPU", 16, 2, "bf16"), "fsdp": ("FSDP", 8, 1, "bf16"),
    "deepspeed_zero2": ("DEEPSPEED", 8, 1, "bf16"), "deepspeed_zero3": ("DEEPSPEED", 8, 1, "bf16"),
}


def test_every_config_is_covered():
    assert {p.stem for p in (ROOT / "examples" / "accelerate_configs").glob("*.yaml")} == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_dry_run(name, monkeypatch):
    """Parse each YAML the way `accelerate launch --config_file` does and build the launch environment, without
    starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import (prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                         prepare_simple_launcher_cmd_env)

    from modeling_nbp import modeling_nbp

    path = ROOT / "examples" / "accelerate_configs" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), SCRIPT, "--help"])
    args, defaults, _ = _validate_launch_command(args)
    kind, processes, machines, precision = CONFIGS[name]
    assert defaults.distributed_type.value == kind
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (processes, machines, precision)
    if kind == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = DeepSpeedPlugin()  # reads the launch environment like the training process would
        assert plugin.zero_stage == int(name[-1]) and plugin.deepspeed_config["gradient_clipping"] == 1.0
    elif kind in ("FSDP", "MULTI_GPU"):
        env = prepare_multi_gpu_env(args)
        if kind == "FSDP":
            assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_USE_ORIG_PARAMS"] == "true"
            assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
            layer = env["FSDP_TRANSFORMER_CLS_TO_WRAP"]
            assert layer == "NBPDecoderLayer" and layer in modeling_nbp.NBPPreTrainedModel._no_split_modules
            assert hasattr(modeling_nbp, layer)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
        assert env["ACCELERATE_USE_CPU"] == str(name == "cpu")
    if name == "multi_node":
        text = path.read_text()
        assert "accelerate launch" in text and "--machine_rank" in text and "--main_process_ip" in text


def test_preset_fills_defaults_and_flags_win(token_data, tmp_path):
    from modeling_nbp.training.train_nbp import build_config, parse_args

    base = ["--train_data", token_data[0], "--output_dir", str(tmp_path)]
    args = parse_args([*base, "--preset", "k600-700m"])
    assert (args.learning_rate, args.global_batch_size, args.warmup_steps) == (1e-3, 64, 10_000)
    assert args.max_steps == 100_000
    assert args.lr_schedule_steps == 4_000_000 and args.optimizer_recipe == "official" and args.dropout == 0.1
    assert parse_args([*base, "--preset", "ucf-3b", "--learning_rate", "1e-4"]).learning_rate == 1e-4
    config = build_config(args, {"latent_shape": [5, 16, 16], "min_label": -1, "max_label": -1}, None)
    assert (config.num_hidden_layers, config.hidden_size, config.condition_mode) == (24, 1536, "frames")
    ucf = parse_args([*base, "--preset", "ucf-700m"])
    with pytest.raises(ValueError, match="labels in \\[0, 200\\], the model 101 classes"):
        build_config(ucf, {"latent_shape": [5, 16, 16], "min_label": 0, "max_label": 200}, None)


@pytest.mark.parametrize("mode", ["frames", "none"])
def test_frame_prediction_and_unconditional_runs(mode, token_data, tmp_path):
    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    torch.manual_seed(0)
    NBPVideoTokenizer(block_out_channels=(8, 8), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                      fsq_levels=(4, 4), norm_num_groups=4, patch_size=2).save_pretrained(tmp_path / "tokenizer")
    summary = main(["--train_data", token_data[0], *TINY, "--max_steps", "2", "--train_batch_size", "4",
                    "--condition_mode", mode, "--output_dir", str(tmp_path / "run"), "--tokenizer",
                    str(tmp_path / "tokenizer"), "--num_samples", "2"])
    assert np.isfinite(summary["train_loss"])
    assert os.path.isfile(tmp_path / "run" / "samples" / "step-0000002" / "samples_1.mp4")


def test_throughput_summary_of_a_run_too_short_to_time():
    meter = common.ThroughputMeter()
    meter.step(100)  # the first step starts the clock and is not counted
    assert meter.describe("tokens/s").startswith("tokens/s n/a") and "nan" not in meter.describe("tokens/s")
    time.sleep(0.01)
    meter.step(100)
    text = meter.describe("clips/s", 1)
    assert text.endswith(" clips/s") and float(text.split()[0]) > 0


def test_the_triton_loss_trains_like_the_chunked_one(token_data, tmp_path, monkeypatch):
    losses = {}
    for loss in ("chunked", "triton"):  # triton: under the interpreter on CPU
        summary = main(["--train_data", token_data[0], *TINY, "--max_steps", "3", "--train_batch_size", "4",
                        "--loss_implementation", loss, "--output_dir", str(tmp_path / loss)])
        losses[loss] = summary["train_loss"]
    assert losses["triton"] == pytest.approx(losses["chunked"], rel=1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="--loss_implementation triton runs on a CUDA device"):
        main(["--train_data", token_data[0], *TINY, "--max_steps", "3", "--loss_implementation", "triton",
              "--output_dir", str(tmp_path / "refused")])


def test_a_run_compiled_by_accelerate_trains_and_resumes_like_an_eager_one(token_data, tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend ...` compiles the prepared model: the training forward is one graph (a
    graph break fails the run), and the log, the checkpoints and final/ (EMA weights included) are the eager run's."""
    args = ["--train_data", token_data[0], "--validation_data", token_data[1], *TINY, "--max_steps", "4",
            "--train_batch_size", "4", "--checkpointing_steps", "2", "--class_dropout_prob", "0.2",
            "--ema_decay", "0.9", "--seed", "7", "--validation_steps", "2"]
    main([*args, "--output_dir", str(tmp_path / "eager")])
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")  # dynamo's tracing without inductor's compile time
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_FULLGRAPH", "true")
    AcceleratorState._reset_state(reset_partial_state=True)  # the state (and its dynamo settings) is read anew
    GradientState._reset_state()
    main([*args, "--output_dir", str(tmp_path / "compiled")])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rs]  # noqa: E731
    assert strip(read_log(tmp_path / "compiled")) == strip(read_log(tmp_path / "eager"))
    for path in ("final/model.safetensors", "checkpoint-2/model.safetensors", "checkpoint-2/ema.safetensors"):
        eager, compiled = load_file(str(tmp_path / "eager" / path)), load_file(str(tmp_path / "compiled" / path))
        assert eager.keys() == compiled.keys() and all(torch.equal(eager[k], compiled[k]) for k in eager), path
    # each run's checkpoint resumes in the other kind of run, to the same losses
    resumed = main([*args, "--output_dir", str(tmp_path / "eager"), "--max_steps", "6", "--resume_from_checkpoint",
                    "latest"])
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert main([*args, "--output_dir", str(tmp_path / "compiled"), "--max_steps", "6",
                 "--resume_from_checkpoint", "latest"])["train_loss"] == resumed["train_loss"]
    assert strip(read_log(tmp_path / "compiled")) == strip(read_log(tmp_path / "eager"))


def test_transformers_trainer_trains_the_generator(tmp_path):
    """The model under transformers' Trainer (token grids and class labels as the dataset's columns): gradient
    accumulation equals the large batch, and Trainer's torch_compile (dynamo's tracing, backend "eager") the eager run."""
    from torch._dynamo.utils import counters
    from transformers import Trainer, TrainingArguments

    grids = torch.randint(0, 16, (16, *GRID), generator=torch.Generator().manual_seed(0))
    rows = [{"video_ids": g, "class_labels": i % CLASSES} for i, g in enumerate(grids)]
    config = NBPConfig(latent_shape=list(GRID), block_shape=[1, 1, 4], video_vocab_size=16, num_classes=CLASSES,
                       condition_mode="class", first_block="hybrid", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, hidden_dropout=0.0)

    def train(batch, accumulation, **options):
        torch.manual_seed(0)
        model = NBPForVideoGeneration(config)
        args = TrainingArguments(output_dir=str(tmp_path / f"run{batch}x{accumulation}{len(options)}"), max_steps=3,
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                 learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0, **options)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        return model, [r["loss"] for r in trainer.state.log_history if "loss" in r]

    large, large_losses = train(4, 1)
    accumulated, accumulated_losses = train(2, 2)
    torch._dynamo.reset()  # no graph of an earlier test can serve this run
    counters.clear()
    compiled, compiled_losses = train(4, 1, torch_compile=True, torch_compile_backend="eager")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph, compiled once
    assert len(large_losses) == 3 and large_losses[-1] < large_losses[0]
    assert accumulated_losses == pytest.approx(large_losses, rel=1e-5)
    assert compiled_losses == pytest.approx(large_losses, rel=1e-6)
    for a, b, c in zip(large.parameters(), accumulated.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


def test_init_from_starts_from_a_pretrained_generator(tmp_path, local_hub, monkeypatch):
    from huggingface_hub import HfApi

    from modeling_nbp.training import train_nbp

    data = write_tokens(tmp_path / "data", 8, 0, class_names=["cat", "dog", "fox"])
    run = ["--train_data", data, *TINY[8:], "--train_batch_size", "4", "--warmup_steps", "0"]  # no size flags
    main([*run, *TINY[:8], "--output_dir", str(tmp_path / "a"), "--max_steps", "2"])
    pretrained = load_file(tmp_path / "a" / "final" / "model.safetensors")
    HfApi().create_repo("test-user/gen")
    HfApi().upload_folder(repo_id="test-user/gen", folder_path=tmp_path / "a" / "final")
    started, labels, build = [], [], train_nbp.NBPForVideoGeneration

    class Recorded(build):  # the weights each run starts from, before its first step, and the labels it trains on
        def set_attn_implementation(self, *args):
            started.append({k: t.clone() for k, t in self.state_dict().items()})
            return super().set_attn_implementation(*args)

        def forward(self, *args, class_labels=None, **kwargs):
            labels.extend([] if class_labels is None else class_labels.tolist())
            return super().forward(*args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(train_nbp, "NBPForVideoGeneration", Recorded)
    for source in (str(tmp_path / "a" / "final"), "test-user/gen"):
        out = tmp_path / source.replace("/", "_")
        main([*run, "--output_dir", str(out), "--max_steps", "1", "--init_from", source])
        assert started[-1].keys() == pretrained.keys()
        assert all(torch.equal(t, pretrained[k]) for k, t in started[-1].items())
    main([*run, *TINY[:8], "--output_dir", str(tmp_path / "fresh"), "--max_steps", "1"])
    assert not all(torch.equal(t, pretrained[k]) for k, t in started[-1].items())
    # two of the model's classes, in a folder of their own: data labels 0, 1 are the model's 1 (dog), 2 (fox)
    subset = write_tokens(tmp_path / "subset", 8, 1, class_names=["dog", "fox"], classes=2)
    labels.clear()
    main(["--train_data", subset, *run[2:], "--output_dir", str(tmp_path / "subset_run"), "--max_steps", "1",
          "--init_from", source])
    assert sorted(set(labels)) == [1, 2]
    with pytest.raises(ValueError, match=r"give one of --preset, --init_from"):  # not the preset's warmup > 1 step
        main([*run, "--output_dir", str(tmp_path / "x"), "--preset", "ucf-700m", "--init_from", source,
              "--max_steps", "1"])
    with pytest.raises(ValueError, match=r"--num_layers cannot be combined with --init_from"):
        main([*run, "--output_dir", str(tmp_path / "x"), "--num_layers", "1", "--init_from", source])


def test_fine_tuning_data_labels_follow_the_pretrained_models_class_names(tmp_path):
    from modeling_nbp.training.train_nbp import data_label_map, model_class_names

    config = NBPConfig(latent_shape=list(GRID), num_classes=3, id2label={0: "cat", 1: "dog", 2: "fox"})
    info = {"class_names": ["dog", "fox"]}  # a folder of two of the classes: its labels are 0 and 1
    assert data_label_map(info, config).tolist() == [1, 2]
    assert data_label_map({"class_names": ["cat", "dog", "fox"]}, config) is None
    assert data_label_map({"class_names": None}, config) is None  # token rows without names: labels as they are
    with pytest.raises(ValueError, match=r"model names \(\['dog'\]\) and classes it does not \(\['owl'\]\)"):
        data_label_map({"class_names": ["dog", "owl"]}, config)
    assert data_label_map({"class_names": ["ant", "bee"]}, config) is None  # new classes train the slots in order
    assert model_class_names(config) == ["ant", "bee", "fox"] and config.label2id["bee"] == 1
    assert model_class_names(NBPConfig(latent_shape=list(GRID), num_classes=2)) is None  # LABEL_0, LABEL_1


def test_a_resume_needs_the_same_init_from(tmp_path):
    data = write_tokens(tmp_path / "data", 8, 0)
    run = ["--train_data", data, *TINY[8:], "--train_batch_size", "4", "--warmup_steps", "0"]
    for name in ("a", "b"):
        main([*run, *TINY[:8], "--output_dir", str(tmp_path / name), "--max_steps", "1"])
    tuned = [*run, "--output_dir", str(tmp_path / "tuned"), "--checkpointing_steps", "1",
             "--resume_from_checkpoint", "latest"]
    main([*tuned, "--max_steps", "1", "--init_from", str(tmp_path / "a" / "final")])
    with pytest.raises(ValueError, match=r"init_from '.*/a/final' on disk, '.*/b/final' now"):
        main([*tuned, "--max_steps", "2", "--init_from", str(tmp_path / "b" / "final")])
    assert main([*tuned, "--max_steps", "2", "--init_from", str(tmp_path / "a" / "final")])["steps"] == 2


def test_a_converted_official_checkpoint_fine_tunes_on_some_of_its_classes(tmp_path, monkeypatch):
    """A UCF-like official checkpoint (text condition of 8 LLaMA ids per class, hybrid start, whole-vocabulary
    sampling), converted, then fine-tuned on a folder of two of its classes: the data's labels become the model's."""
    from test_conversion import write_generator

    from modeling_nbp.conversion import convert_checkpoints
    from modeling_nbp.training import train_nbp
    from modeling_nbp.ucf101 import ucf101_id2label

    write_generator(tmp_path / "gen.ckpt", "ucf")
    convert_checkpoints(tmp_path / "converted", generator=tmp_path / "gen.ckpt")
    names = ucf101_id2label()
    data = write_tokens(tmp_path / "data", 8, 0, class_names=[names[4], names[2]], classes=2)
    labels, build = [], train_nbp.NBPForVideoGeneration

    class Recorded(build):
        def forward(self, *args, class_labels=None, **kwargs):
            labels.extend(class_labels.tolist())
            return super().forward(*args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(train_nbp, "NBPForVideoGeneration", Recorded)
    summary = main(["--train_data", data, *TINY[8:], "--train_batch_size", "4", "--max_steps", "2", "--output_dir",
                    str(tmp_path / "run"), "--init_from", str(tmp_path / "converted")])
    assert sorted(set(labels)) == [2, 4] and math.isfinite(summary["train_loss"])
    tuned = NBPConfig.from_pretrained(tmp_path / "run" / "final")
    assert tuned.sample_whole_vocabulary and tuned.id2label == {i: names[i] for i in range(101)}


def test_the_bundled_demo_model_fine_tunes_on_a_digits_folder(tmp_path, monkeypatch):
    """`nbp pretokenize --tokenizer demo` then `nbp train --init_from demo --tokenizer demo`: the demo tokenizer's
    clips (17 frames of 32x32 at 8 fps) are the defaults, and the folder's digit classes are the model's."""
    from modeling_nbp.data import write_moving_digits_folder
    from modeling_nbp.data.pretokenize import main as pretokenize_main
    from modeling_nbp.demo import DEMO_DATA
    from modeling_nbp.training import train_nbp

    monkeypatch.chdir(tmp_path)  # "demo" is no folder here
    digits = {k: v for k, v in DEMO_DATA.items() if k != "num_frames"}
    write_moving_digits_folder(tmp_path / "videos", 1, seed=5, num_frames=17, **digits)
    for name in ("1", "2", "4", "5", "6", "7", "8", "9"):  # a folder of 0 and 3 only
        shutil.rmtree(tmp_path / "videos" / name)
    pretokenize_main(["--data", "videos", "--tokenizer", "demo", "--output_dir", "tokens", "--device", "cpu"])
    assert load_token_dataset("tokens")[0]["input_ids"].shape == (5, 8, 8)
    labels, build = [], train_nbp.NBPForVideoGeneration

    class Recorded(build):
        def forward(self, *args, class_labels=None, **kwargs):
            labels.extend([] if class_labels is None else class_labels.tolist())
            return super().forward(*args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(train_nbp, "NBPForVideoGeneration", Recorded)
    main(["--train_data", "tokens", *TINY[8:], "--train_batch_size", "2", "--max_steps", "2", "--output_dir", "run",
          "--init_from", "demo", "--tokenizer", "demo"])
    assert sorted(set(labels)) == [0, 3]
    assert NBPVideoPipeline.from_pretrained(tmp_path / "run" / "final").class_names == list("0123456789")


def test_fine_tuning_keeps_the_pretrained_models_dropout_unless_given(tmp_path):
    """A model trained with class dropout (for guidance) goes on with it: the flags' from-scratch defaults (dropout 0.1,
    class dropout 0) would freeze its unconditional embedding under a generation_config that still guides."""
    data = write_tokens(tmp_path / "data", 8, 0, class_names=["cat", "dog", "fox"])
    run = ["--train_data", data, *TINY[8:], "--train_batch_size", "4", "--max_steps", "1", "--warmup_steps", "0"]
    main([*run, *TINY[:8], "--output_dir", str(tmp_path / "a"), "--dropout", "0.2", "--class_dropout_prob", "0.3",
          "--guidance_scale", "2"])
    source = ["--init_from", str(tmp_path / "a" / "final")]
    main([*run, *source, "--output_dir", str(tmp_path / "tuned"), "--guidance_scale", "3"])
    tuned = NBPConfig.from_pretrained(tmp_path / "tuned" / "final")
    assert (tuned.hidden_dropout, tuned.class_dropout_prob) == (0.2, 0.3)
    main([*run, *source, "--output_dir", str(tmp_path / "flags"), "--dropout", "0", "--class_dropout_prob", "0"])
    flags = NBPConfig.from_pretrained(tmp_path / "flags" / "final")
    assert (flags.hidden_dropout, flags.class_dropout_prob) == (0.0, 0.0)


def test_samples_of_a_model_fine_tuned_on_new_classes_show_those_classes(tmp_path, monkeypatch):
    """The demo (digits 0-9) fine-tuned on two new classes: they take its classes 0 and 1, and the sample videos show
    them, not the untouched digits 2 and 3."""
    from modeling_nbp.training import train_nbp

    data = write_tokens(tmp_path / "data", 4, 0, grid=(5, 8, 8), class_names=["ant", "bee"], classes=2)
    shown = []
    monkeypatch.setattr(train_nbp, "sample_videos", lambda *args: shown.append(args[-1]))
    main(["--train_data", data, *TINY[8:], "--train_batch_size", "2", "--max_steps", "1", "--warmup_steps", "0",
          "--output_dir", str(tmp_path / "run"), "--init_from", "demo", "--tokenizer", "demo", "--num_samples", "4"])
    assert shown == [[0, 1]]
    assert NBPConfig.from_pretrained(tmp_path / "run" / "final" / "transformer").id2label[1] == "bee"


def test_num_context_frames_sets_a_given_models_and_is_refused_where_unused(tmp_path):
    """--num_context_frames (a sampling setting) changes an --init_from frame-prediction model's; it and the dropouts
    are range-checked before the run makes anything; a model without context frames refuses it."""
    data = write_tokens(tmp_path / "data", 8, 0)
    run = ["--train_data", data, *TINY[8:], "--train_batch_size", "4", "--max_steps", "1", "--warmup_steps", "0"]
    main([*run, *TINY[:8], "--output_dir", str(tmp_path / "frames"), "--condition_mode", "frames"])
    assert NBPConfig.from_pretrained(tmp_path / "frames" / "final").num_context_frames == 1  # the default
    source = ["--init_from", str(tmp_path / "frames" / "final")]
    main([*run, *source, "--output_dir", str(tmp_path / "tuned"), "--num_context_frames", "0"])
    assert NBPConfig.from_pretrained(tmp_path / "tuned" / "final").num_context_frames == 0
    with pytest.raises(ValueError, match=r"num_context_frames \(2\) must be a multiple .* in \[0, 2\)"):
        main([*run, *source, "--output_dir", str(tmp_path / "x"), "--num_context_frames", "2"])
    with pytest.raises(ValueError, match=r"hidden_dropout must lie in \[0, 1\], got 5"):
        main([*run, *source, "--output_dir", str(tmp_path / "x"), "--dropout", "5"])
    assert not (tmp_path / "x").exists()  # refused before the run made anything
    with pytest.raises(ValueError, match=r"--num_context_frames is for frame prediction .* condition_mode is 'class'"):
        main([*run, *TINY[:8], "--output_dir", str(tmp_path / "x"), "--num_context_frames", "1"])
