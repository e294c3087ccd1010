"""Every script in examples/ starts and explains itself (an import or argument error shows up here first)."""

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_examples_cover_training_generation_and_evaluation():
    assert {"train_nbp", "train_tokenizer", "generate", "evaluate"} <= {p.stem for p in EXAMPLES}


def test_study_checks_its_fvd_sampling_before_training(monkeypatch, capsys):
    study = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "nbp_vs_ntp_study.py"))

    def no_training(argv):
        raise AssertionError("a model was trained before the arguments were checked")

    monkeypatch.setitem(study["main"].__globals__, "train_nbp", no_training)
    for flags, message in ((["--num_videos", "64"], r"--fvd_samples must be an int in \[2, 64\].*got 96"),
                           (["--num_videos", "48", "--fvd_samples", "48"], "every repeat would use all videos")):
        with pytest.raises(SystemExit) as exited:
            study["main"](["--tokens", "tokens", *flags])
        assert exited.value.code == 2
        assert re.search(message, capsys.readouterr().err), flags


def test_generate_refuses_bad_sampling_values_as_usage_errors(tmp_path, monkeypatch, capsys):
    import modeling_nbp.generate_videos as generate_videos
    from modeling_nbp.cli import main as nbp

    def no_run(args, **kwargs):
        raise AssertionError("the run started before the sampling values were checked")

    monkeypatch.setattr(generate_videos, "run_generate", no_run)
    for flags, message in ((["--top_k", "-1"], "--top_k: expected an integer >= 0"),
                           (["--top_p", "1.5"], r"--top_p: expected a number in \(0, 1\]"),
                           (["--top_p", "0"], r"--top_p: expected a number in \(0, 1\]"),
                           (["--temperature", "-1"], "--temperature: expected a finite number >= 0"),
                           (["--guidance_scale", "nan"], "--guidance_scale: expected a finite number >= 0")):
        with pytest.raises(SystemExit) as exited:
            nbp(["generate", "--model", "demo", "--output_dir", str(tmp_path / "out"), *flags])
        assert exited.value.code == 2 and re.search(message, capsys.readouterr().err), flags
    assert not (tmp_path / "out").exists()


def study_without_models(monkeypatch, train_nbp=lambda argv: {}):
    """The study's main with `train_nbp` given, a stand-in pipeline whose videos are the real ones squared, and a
    detector that takes the mean colour (the study's own real set, FVD and tables run as they are)."""
    import torch

    from modeling_nbp.evaluation.fvd import FVDCalculator

    class MeanColour(torch.nn.Module):
        def forward(self, videos):
            return videos.mean(dim=(2, 3, 4))

    class Pipeline:  # what the study reads of a trained pipeline
        class transformer:
            class config:
                num_context_frames = 2

            class layout:
                decode_schedule = staticmethod(lambda num_context_tokens: [(0, 1)])
                context_tokens = staticmethod(lambda num_context_frames: 64 * num_context_frames)

        @classmethod
        def from_pretrained(cls, path):
            return cls()

        def set_progress_bar_config(self, **kwargs):
            pass

    study = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "nbp_vs_ntp_study.py"))
    scope = study["main"].__globals__
    monkeypatch.setitem(scope, "train_nbp", train_nbp)
    monkeypatch.setitem(scope, "NBPVideoPipeline", Pipeline)
    monkeypatch.setitem(scope, "generate", lambda pipe, task, real, num_videos, seed: (real[:num_videos] ** 2, 0.0))
    monkeypatch.setitem(scope, "FVDCalculator", lambda **options: FVDCalculator(MeanColour(), "cpu", **options))
    monkeypatch.setitem(scope, "VARIANTS", {"NTP 1x1x1": "1,1,1"})
    return study["main"], scope, MeanColour


def test_study_scores_against_its_own_real_set_when_rerun_with_other_sizes(tmp_path, monkeypatch):
    import json

    import torch

    from modeling_nbp.evaluation.fvd import FVDCalculator

    main, scope, MeanColour = study_without_models(monkeypatch)
    output = ["--tokens", "tokens", "--output_dir", str(tmp_path), "--fvd_repeats", "1"]
    main([*output, "--num_videos", "6", "--fvd_samples", "6"])
    main([*output, "--num_videos", "4", "--fvd_samples", "4"])  # the same folder, a smaller real set
    real = torch.stack([scope["MovingDigits"](4, seed=scope["HELD_OUT_SEED"], **scope["DEMO_DATA"])[i]["video"]
                        for i in range(4)])
    expected = FVDCalculator(MeanColour(), "cpu", progress=False).fvd(real**2, real)["mean"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["fvd_mean"] for r in results][0] == pytest.approx(expected, rel=1e-9)


def test_train_demo_script_takes_any_runs_folder_resumes_and_ships_the_package_model(tmp_path, monkeypatch):
    """examples/train_demo.sh with its commands stubbed: a RUNS folder with a space, run from elsewhere and
    interrupted during the generator's training, then rerun; its last step run on a tiny trained pipeline."""
    import json
    import os
    import subprocess

    import modeling_nbp.demo
    from test_pipeline import tiny_pipeline

    bin_dir, runs, log = tmp_path / "bin", tmp_path / "my runs", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    (bin_dir / "nbp").write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == os.environ.get("FAIL_AT"):
    sys.exit(130)  # interrupted
if args[0] == "make-digits":  # as the real one: refuses a folder that holds clips, writes class folders
    out = args[args.index("--output_dir") + 1]
    if os.path.exists(out):
        sys.exit(f"{{out}} already holds clips")
    os.makedirs(os.path.join(out, "0"))
""")
    (bin_dir / "python").write_text(f"#!/bin/sh\ncat > {str(tmp_path / 'ship.py')!r}\n")
    for stub in ("nbp", "python"):
        os.chmod(bin_dir / stub, 0o755)
    script = Path(__file__).resolve().parents[1] / "examples" / "train_demo.sh"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RUNS=str(runs), FAIL_AT="train")
    assert subprocess.run(["bash", str(script)], cwd=tmp_path, env=env).returncode == 130
    env.pop("FAIL_AT")
    assert subprocess.run(["bash", str(script)], cwd=tmp_path, env=env).returncode == 0  # resumes
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    outputs = [c[c.index("--output_dir") + 1] for c in calls]
    assert outputs[:2] == [f"{runs}/digits_train.partial", f"{runs}/digits_val.partial"]  # made once, whole
    assert sorted(os.listdir(runs)) == ["digits_train", "digits_val"]
    assert [c[0] for c in calls[2:]] == ["train-tokenizer", "pretokenize", "pretokenize", "train"] * 2
    assert outputs[2:6] == [f"{runs}/{name}" for name in ("tokenizer", "tokens_train", "tokens_val", "generator")]
    assert all("--resume_from_checkpoint" in c for c in calls if c[0].startswith("train"))
    # the last step ships the trained generator to the package's demo folder, wherever the script runs from
    trained = tiny_pipeline()
    trained.save_pretrained(runs / "generator" / "final")
    monkeypatch.setattr(modeling_nbp.demo, "DEMO_MODEL", str(tmp_path / "shipped"))
    monkeypatch.setenv("RUNS", str(runs))
    exec(compile((tmp_path / "ship.py").read_text(), "ship.py", "exec"), {})
    config = json.loads((tmp_path / "shipped" / "transformer" / "config.json").read_text())
    assert config["dtype"] == "float16"
    positions = trained.transformer.layout.sequence_length  # the position table cut to the layout's sequence
    assert config["max_position_embeddings"] == positions < trained.transformer.config.max_position_embeddings
