"""Argument and environment validation of `check_official` (no checkout of the official NBP code needed)."""

import argparse
import os

import pytest
import torch

from modeling_nbp.conversion import check_official, generator_from_checkpoint
from modeling_nbp.conversion.check_official import OFFICIAL_FILES, id_row, main, our_models, value_row
from test_conversion import lightning_checkpoint, official_gpt_tensors, training_args
from test_conversion import SETTINGS as CHECKPOINT_SETTINGS


@pytest.fixture
def files(tmp_path):
    """An empty official-looking checkout, placeholder checkpoint files (never read: validation stops first) and a
    DeepSpeed checkpoint folder."""
    repo = tmp_path / "NBP"
    for name in OFFICIAL_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("")
    (tmp_path / "gen.ckpt").write_bytes(b"")
    (tmp_path / "tok.pt").write_bytes(b"")
    (tmp_path / "best.ckpt" / "checkpoint").mkdir(parents=True)
    (tmp_path / "best.ckpt" / "latest").write_text("checkpoint")
    return tmp_path


def exit_message(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    ([], "give --generator, --tokenizer or both"),
    (["--generator", "missing.ckpt"], "--generator: checkpoint file not found: missing.ckpt"),
    (["--generator", "{d}/best.ckpt"], "best.ckpt is a folder, not a checkpoint file: it looks like a DeepSpeed"),
    (["--tokenizer", "{d}/tok.pt", "--frames", "8"], "--frames must be 1 + 4k"),
    (["--tokenizer", "{d}/tok.pt", "--resolution", "20"], "--resolution must be a positive multiple of 8"),
    (["--tokenizer", "{d}/tok.pt", "--rtol", "0"], "--rtol must be positive"),
    (["--tokenizer", "{d}/tok.pt", "--max_id_flips", "-1"], "--max_id_flips must be >= 0"),
    (["--tokenizer", "{d}/tok.pt", "--device", "tpu"], "--device"),
    (["--generator", "{d}/gen.ckpt", "--converted", "{d}"], "has no transformer/ folder to compare with --generator"),
])
def test_bad_arguments_are_named(files, capsys, extra, message):
    argv = ["--official_repo", str(files / "NBP")] + [a.format(d=files) for a in extra]
    assert message in exit_message(capsys, argv)


def test_incomplete_official_checkout_names_the_missing_files(files, capsys):
    os.remove(files / "NBP" / "nbp" / "magvit2.py")
    err = exit_message(capsys, ["--official_repo", str(files / "NBP"), "--tokenizer", str(files / "tok.pt")])
    assert "lacks nbp/magvit2.py" in err and "gpt.py" not in err
    err = exit_message(capsys, ["--official_repo", str(files / "nowhere"), "--tokenizer", str(files / "tok.pt")])
    assert "is not a folder" in err


def test_missing_official_dependency_is_named(files, capsys, monkeypatch):
    monkeypatch.setattr(check_official, "REQUIRED_PACKAGES", ("json", "no_such_package_for_nbp"))
    err = exit_message(capsys, ["--official_repo", str(files / "NBP"), "--tokenizer", str(files / "tok.pt")])
    assert "needs no_such_package_for_nbp," in err and "json" not in err


def test_rows_pass_only_within_their_tolerance():
    official = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert value_row("x", official + 3e-4, official, rtol=1e-4)["ok"]
    assert not value_row("x", official + 5e-4, official, rtol=1e-4)["ok"]
    assert not value_row("x", official[:1], official, rtol=1e-4)["ok"]  # shapes differ
    ids = torch.arange(10)
    assert id_row("ids", ids, ids)["ok"]
    changed = ids.clone()
    changed[7] = 0
    row = id_row("ids", changed, ids, max_flips=1)
    assert row["ok"] and row["agreement"] == pytest.approx(0.9)
    assert "1 differ, the first at flat index 7" in row["detail"]
    assert not id_row("ids", changed, ids)["ok"]


def test_nbp_check_conversion_returns_the_check_status(files, monkeypatch):
    from modeling_nbp import cli

    monkeypatch.setattr(check_official, "main", lambda argv: 1 if "--generator" in argv else 0)
    assert cli.main(["check-conversion", "--official_repo", "NBP", "--generator", "x.ckpt"]) == 1
    assert cli.main(["check-conversion", "--official_repo", "NBP", "--tokenizer", "y.pt"]) == 0
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_info:  # the real parser: usage errors exit with status 2
        cli.main(["check-conversion", "--official_repo", str(files / "NBP")])
    assert exit_info.value.code == 2


def test_a_converted_folder_of_another_checkpoint_is_named(tmp_path):
    """--converted must be the conversion of --generator: a K600 folder given with a UCF checkpoint used to crash
    inside the comparisons (a RuntimeError from drawing class labels of a model without classes)."""
    checkpoints = {}
    for setting in ("ucf", "k600"):
        args = training_args(**CHECKPOINT_SETTINGS[setting])
        checkpoints[setting] = lightning_checkpoint(args, official_gpt_tensors(args))
    model, _ = generator_from_checkpoint(checkpoints["k600"])
    model.save_pretrained(tmp_path / "out" / "transformer")
    args = argparse.Namespace(converted=str(tmp_path / "out"), device="cpu")
    assert our_models(args, checkpoints["k600"], None)[0].config.condition_mode == "frames"
    with pytest.raises(ValueError, match=r"is not a conversion of this checkpoint: its transformer/ has "
                                         r"condition_mode frames \(checkpoint: class\)"):
        our_models(args, checkpoints["ucf"], None)
