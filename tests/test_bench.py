"""`nbp bench`: the generation and training tables, on a tiny model (the timings themselves are not checked)."""

import math

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
