"""`nbp bench`: the generation and training tables, on a tiny model (the timings themselves are not checked)."""

import math
import time
from types import SimpleNamespace

import pytest
import torch

from modeling_nbp import bench


def test_generation_rows_and_ratios():
    rows = bench.generation_rows("tiny", torch.device("cpu"), torch.float32, batches=(1,), repeats=1, ntp_repeats=1,
                                 log=lambda row: None, variants=("optimized",), ntp_batches=())
    assert [(r["method"], r["variant"], r["batch"], r["steps"]) for r in rows] == [("NBP", "optimized", 1, 48)]
    assert math.isclose(rows[0]["fps"], bench.GENERATED_FRAMES * 1000 / rows[0]["ms_per_video"])
    assert rows[0]["first_call_ms"] > 0
    low, high = rows[0]["ms_range"]
    assert low <= rows[0]["ms_per_video"] <= high
    assert "NBP    optimized            1    48" in bench.format_table(rows)
    # ratios are taken between rows of the same batch
    fake = [dict(method=m, variant=v, batch=b, ms_per_video=ms) for m, v, b, ms in
            (("NBP", "eager", 1, 40.0), ("NBP", "optimized", 1, 10.0), ("NTP", "eager", 1, 400.0),
             ("NTP", "optimized", 1, 200.0), ("NBP", "optimized", 8, 5.0))]
    assert bench.generation_ratios(fake) == {"NBP speed-up over NTP (eager, batch 1)": 10.0,
                                             "NBP speed-up over NTP (optimized, batch 1)": 20.0,
                                             "NBP optimized over eager (batch 1)": 4.0,
                                             "NTP optimized over eager (batch 1)": 2.0}


def test_generation_rows_count_no_earlier_rows_decoder_in_a_peak(monkeypatch):
    """Each row's peak-memory count starts with no static decoder held: on CUDA the previous row's (its KV cache,
    11 GiB at batch 64 for the 700M model) made a later batch-1 row report 13 GiB instead of 2.3 (H100 run 3)."""
    models, held = [], []
    build = bench.build
    monkeypatch.setattr(bench, "build", lambda *args, **kwargs: models.append(build(*args, **kwargs)) or models[-1])
    monkeypatch.setattr(bench, "reset_peak_memory",
                        lambda device: held.append(getattr(models[-1], "_static_decoder", None)))
    monkeypatch.setitem(bench.VARIANTS, "static, no graphs", dict(cache_implementation="static", use_cuda_graphs=False))
    rows = bench.generation_rows("tiny", torch.device("cpu"), torch.float32, batches=(1, 2), repeats=1, ntp_repeats=1,
                                 sampling=dict(temperature=0.0), log=lambda row: None,  # greedy: fast on CPU
                                 variants=("optimized", "static, no graphs"), ntp_batches=())
    assert [(r["variant"], r["batch"]) for r in rows] == [("optimized", 1), ("optimized", 2), ("static, no graphs", 1),
                                                         ("static, no graphs", 2)]
    assert held == [None] * 4


def test_compared_rows_generate_from_the_same_context(monkeypatch):
    """NBP and NTP rows of a variant and batch size get the same context ids: they were drawn from the global RNG
    in row order, so an NBP-only variant (--compile) before the others gave NTP's rows other contexts."""
    contexts = {}
    build = bench.build

    def recording_build(size, block, *args, **kwargs):
        model = build(size, block, *args, **kwargs)
        model.generate_video_tokens = lambda context_ids, **kw: contexts.setdefault(
            (block, kw.get("compile_decode"), kw["cache_implementation"], len(context_ids)), context_ids.clone())
        return model

    monkeypatch.setattr(bench, "build", recording_build)
    bench.generation_rows("tiny", torch.device("cpu"), torch.float32, batches=(1, 2), repeats=1, ntp_repeats=1,
                          log=lambda row: None, variants=("eager", "compiled", "optimized"))
    for cache in ("dynamic", "static"):
        for batch in (1, 2):
            nbp, ntp = (contexts[(block, None, cache, batch)] for block in ((1, 1, 16), (1, 1, 1)))
            assert torch.equal(nbp, ntp), (cache, batch)


def test_cuda_timing_and_memory_follow_the_given_device(monkeypatch):
    """CUDA events are recorded on the stream of the device the work runs on (the current device's stream would time
    another GPU's queue for `--device cuda:1`), and the peak memory is that device's."""
    calls = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            calls.append(("record", stream))

        def synchronize(self):
            calls.append(("synchronize",))

        def elapsed_time(self, end):
            return 250.0  # ms

    device = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**30 if device == torch.device("cuda", 1)
                        else 0)
    assert bench.timings(lambda: calls.append(("fn",)), device, repeats=1, warmup=0) == [0.25]
    assert calls == [("record", "stream of cuda:1"), ("fn",), ("record", "stream of cuda:1"), ("synchronize",)]
    calls.clear()
    bench.reset_peak_memory(device)
    assert calls == [("sync", device), ("reset", device)] and bench.peak_memory_gib(device) == 1.0


def test_training_rows(capsys):
    seen = []
    rows = bench.training_rows("tiny", torch.device("cpu"), [1], repeats=1, peak_tflops=1.0, log=lambda row: None,
                               inspect=lambda batch, step: seen.append(batch))
    (row,) = rows
    assert row["batch"] == 1 and row["tokens_per_step"] == 1264 and seen == [1]
    assert math.isclose(row["tokens_per_s"], 1264 / (row["step_ms"] / 1000))
    assert math.isclose(row["mfu"], row["tflops"] / 1.0)  # against the given peak of 1 TFLOP/s
    assert math.isnan(row["peak_gib"])  # no GPU memory counter on CPU
    table = bench.format_training_table(rows + [dict(batch=64, tokens_per_step=64 * 1264, out_of_memory=True)])
    assert "    1    1264" in table and "out of memory" in table


def test_flex_attention_training_is_refused_on_cpu(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--train", "--device", "cpu", "--attn_implementation", "flex_attention"])
    assert "flex_attention trains on CUDA only" in capsys.readouterr().err


def test_options_that_cannot_run_are_refused_before_any_timing(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU runs no Triton kernel outside the tests
    monkeypatch.setattr(bench, "generation_rows", lambda *a, **k: pytest.fail("timed before checking the options"))
    monkeypatch.setattr(bench, "training_rows", lambda *a, **k: pytest.fail("timed before checking the options"))
    for flags, message in ((["--triton"], "--triton runs on a CUDA device"),
                           (["--train", "--triton"], "--triton and --autotune time generation, not --train"),
                           (["--train", "--autotune"], "--triton and --autotune time generation, not --train"),
                           (["--train", "--peak_tflops", "0"], "--peak_tflops: expected a finite number > 0")):
        with pytest.raises(SystemExit) as exited:
            bench.main(["--device", "cpu", "--size", "tiny", *flags])
        assert exited.value.code == 2 and message in capsys.readouterr().err, flags


def test_bad_devices_and_options_of_the_other_mode_are_refused(monkeypatch, capsys):
    """A device the timings do not synchronise with, a missing GPU, and options the run would ignore (training
    options without --train: minutes of generation timed instead) are usage errors, not tracebacks or silence."""
    monkeypatch.setattr(bench, "generation_rows", lambda *a, **k: pytest.fail("timed before checking the options"))
    monkeypatch.setattr(bench, "training_rows", lambda *a, **k: pytest.fail("timed before checking the options"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for flags, message in ((["--device", "mps"], "--device: expected cpu or cuda[:index], got 'mps'"),
                           (["--device", "gpu"], "--device: expected cpu or cuda[:index], got 'gpu'"),
                           (["--device", "cuda:1"], "--device cuda:1: no such CUDA device (0 available)"),
                           (["--train_batch", "4"], "--train_batch: for --train only"),
                           (["--gradient_checkpointing"], "--gradient_checkpointing: for --train only"),
                           (["--train", "--dtype", "bfloat16", "--large_batch", "2"],
                            "--dtype, --large_batch: for generation, not --train")):
        with pytest.raises(SystemExit) as exited:
            bench.main(["--size", "tiny", *flags])
        assert exited.value.code == 2 and message in capsys.readouterr().err, flags


def test_defaults_follow_the_chosen_device(monkeypatch, capsys):
    """`--device cpu` on a GPU machine gets the CPU defaults: it failed on flex attention, which it never asked for."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "training_rows", lambda *args, **kwargs: calls.append(args) or [])
    bench.main(["--train", "--device", "cpu"])
    assert calls == [("small", torch.device("cpu"), [2], "sdpa", False, 3, False, None)]
    assert "attention=sdpa float32 loss=chunked" in capsys.readouterr().out


def test_gpu_check_decides_by_the_runs_spread_and_the_checks():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = [dict(method="NBP", variant=v, batch=b, ms_per_video=ms, ms_range=spread) for v, b, ms, spread in (
        ("eager", 1, 500.0, (490.0, 510.0)), ("optimized", 1, 115.0, (112.0, 120.0)),
        ("triton", 1, 60.0, (58.0, 63.0)), ("triton-attention", 1, 113.0, (110.0, 118.0)),  # inside the spread
        ("optimized", 64, 8.8, (8.7, 8.9)), ("triton-attention", 64, 7.5, (7.4, 7.6)))]
    checks = {"fp32 triton vs eager, greedy (equal tokens)": 1.0,
              "fp32 triton-attention vs eager, greedy (equal tokens)": 1.0,
              "bf16 static step logits vs fp32, max error (bf16 eps)": 1.2,
              "bf16 triton step logits vs fp32, max error (bf16 eps)": 1.1,
              "bf16 triton-attention step logits vs fp32, max error (bf16 eps)": 2.0}
    lines = gpu_check.decode_decisions({"generation": {"rows": rows}, "triton checks": checks})
    assert lines[0].startswith("decision, NBP batch 1: beyond the spread of optimized (112.00-120.00 ms): triton 60.00")
    assert "checks passed" in lines[0] and "triton-attention" not in lines[0]
    assert "triton-attention 7.50 ms (1.17x; checks FAILED" in lines[1]  # its bf16 error is over 1.25x the step's
    del checks["bf16 static step logits vs fp32, max error (bf16 eps)"]
    assert "checks missing" in gpu_check.decode_decisions({"generation": {"rows": rows}, "triton checks": checks})[0]
    pipeline = {"decode 17 frames ms": 34.6, "decode 17 frames ms, triton norms": 30.1,
                "decode 17 frames ms, triton norms + frames2d": 21.0, "decode 17 frames, kernel profile": {},
                "end-to-end ms per video": 184.2, "end-to-end ms per video, overlap_decode": "error: ..."}
    assert gpu_check.pipeline_rankings({"pipeline": pipeline}) == [
        "ranking, decode 17 frames: triton norms + frames2d 21.0 ms; triton norms 30.1 ms; default 34.6 ms",
        "ranking, end to end: default 184.2 ms"]


def test_study_times_generation_after_a_warm_up():
    """The NBP-vs-NTP study's seconds per video leave out the pipeline's first call: it timed that one, so the first
    variant (class-conditional NTP) carried the process's one-time costs (0.86 s/video against 0.10 after it for 4
    videos of a tiny model on this machine)."""
    import runpy
    from pathlib import Path

    study = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "nbp_vs_ntp_study.py"))
    calls = []

    class Pipe:  # 2 latent context frames = 5 pixel frames
        transformer = SimpleNamespace(config=SimpleNamespace(num_context_frames=2))
        video_tokenizer = SimpleNamespace(num_frames_for_latent=lambda k: 1 + 4 * (k - 1))

        def __call__(self, generator, **kwargs):
            calls.append([g.initial_seed() for g in generator])
            if len(calls) == 1:
                time.sleep(0.3)  # the one-time costs
            return SimpleNamespace(frames=torch.zeros(len(generator), 17, 3, 4, 4))

    real = torch.rand(2, 3, 17, 4, 4)
    for task in ("class-conditional", "frame prediction"):
        calls.clear()
        videos, seconds = study["generate"](Pipe(), task, real, num_videos=2, seed=5)
        assert videos.shape == (2, 3, 17, 4, 4) and calls == [[5, 6], [5, 6]]  # the same videos twice
        assert seconds < 0.1, task
