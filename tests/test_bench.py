"""`nbp bench`: the generation and training tables, on a tiny model (the timings themselves are not checked)."""

import math

import pytest
import torch

from modeling_nbp import bench


def test_generation_rows_and_ratios():
    rows = bench.generation_rows("tiny", torch.device("cpu"), torch.float32, batches=(1,), repeats=1, ntp_repeats=1,
                                 log=lambda row: None, variants=("optimized",), ntp_batches=())
    assert [(r["method"], r["variant"], r["batch"], r["steps"]) for r in rows] == [("NBP", "optimized", 1, 48)]
    assert rows[0]["fps"] == bench.GENERATED_FRAMES * 1000 / rows[0]["ms_per_video"] and rows[0]["first_call_ms"] > 0
    assert "NBP    optimized      1    48" in bench.format_table(rows)
    # ratios are taken between rows of the same batch
    fake = [dict(method=m, variant=v, batch=b, ms_per_video=ms) for m, v, b, ms in
            (("NBP", "eager", 1, 40.0), ("NBP", "optimized", 1, 10.0), ("NTP", "eager", 1, 400.0),
             ("NTP", "optimized", 1, 200.0), ("NBP", "optimized", 8, 5.0))]
    assert bench.generation_ratios(fake) == {"NBP speed-up over NTP (eager, batch 1)": 10.0,
                                             "NBP speed-up over NTP (optimized, batch 1)": 20.0,
                                             "NBP optimized over eager (batch 1)": 4.0,
                                             "NTP optimized over eager (batch 1)": 2.0}


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
