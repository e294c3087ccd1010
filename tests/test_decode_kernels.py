"""The Triton decode kernels (`compile_decode="triton"`): on CUDA, or on CPU under Triton's interpreter (conftest
sets TRITON_INTERPRET=1 there)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("triton")

from modeling_nbp import decode_kernels, generation  # noqa: E402
from modeling_nbp.bench import forced_step_logits  # noqa: E402
from test_modeling_nbp import captured_host_reads, make_model, replay_graphs  # noqa: E402,F401 (a fixture)
from triton_interpreter import guard_intact, guarded  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 sums differ only in their order; half precision: one rounding of each result (bfloat16 under the
# interpreter as on a GPU: conftest's `interpret_bfloat16_as_a_gpu`)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def close(actual, expected, dtype):
    """Within the dtype's tolerance (a NaN, e.g. from a read past a `guarded` input, fails)."""
    scale = expected.abs().max().clamp(min=1)
    assert (actual.float() - expected.float()).abs().max() <= TOLERANCE[dtype] * scale


@pytest.fixture(params=[None, (16, 64, 4, 4, 2), (32, 32, 4, 4, 4)], ids=["default", "split 2", "split 4"])
def tiling(request, monkeypatch):
    """The products' tiling (the interpreter takes the first candidate): the default, or K split over 2 or 4
    programs whose sums the last one to finish adds."""
    if request.param is not None:
        monkeypatch.setattr(decode_kernels, "_TILINGS", [request.param])
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 40, 24), (16, 96, 72), (70, 200, 130)])  # 70 rows: two row blocks
def test_linear_and_its_epilogues(dtype, M, N, K, tiling):
    g = torch.Generator().manual_seed(M)
    x, w, b, r = (guarded(torch.randn(shape, generator=g).to(DEVICE, dtype))
                  for shape in ((M, K), (N, K), (N,), (M, N)))
    product = F.linear(x.float(), w.float(), b.float())
    close(decode_kernels.linear(x, w, b), product, dtype)
    close(decode_kernels.linear(x, w), F.linear(x.float(), w.float()), dtype)
    close(decode_kernels.linear(x, w, b, gelu=True), F.gelu(product), dtype)
    close(decode_kernels.linear(x, w, b, residual=r), product + r.float(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_inside_the_next_product(dtype, tiling):
    """A product that writes the residual stream returns its rows' statistics by column block (100 columns: four
    blocks, the last one partial); the next product normalises its input with them, as F.layer_norm then F.linear.
    The stream's mean of 10 would cost digits to a sum-of-squares variance."""
    M, K, N = 5, 72, 100
    g = torch.Generator().manual_seed(2)
    x, w, b, r, w2, b2, gain, shift = (guarded(torch.randn(shape, generator=g).to(DEVICE, dtype)) for shape in (
        (M, K), (N, K), (N,), (M, N), (40, N), (40,), (N,), (N,)))
    y, stats = decode_kernels.linear(x, w, b, residual=guarded(r + 10), stats=True)
    close(y, F.linear(x.float(), w.float(), b.float()) + (r + 10).float(), dtype)
    assert stats.shape == (-(-N // decode_kernels._TILINGS[0][0]), 3, M)  # one slice per column block
    y, stats = guarded(y), guarded(stats)
    normed = F.layer_norm(y.float(), (N,), gain.float(), shift.float(), 1e-5).to(dtype)
    out = decode_kernels.linear(y, w2, b2, norm=(gain, shift, 1e-5, stats))
    close(out, F.linear(normed.float(), w2.float(), b2.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_and_its_row_statistics(dtype, tiling):
    """The step's input from ids that are a slice of the sequence (not contiguous), and the layer norm of the first
    layer from its statistics."""
    g = torch.Generator().manual_seed(5)
    tokens_, positions, gain, shift, w = (guarded(torch.randn(shape, generator=g).to(DEVICE, dtype))
                                          for shape in ((50, 24), (40, 24), (24,), (24,), (30, 24)))
    sequence = torch.randint(0, 50, (3, 20), generator=g).to(DEVICE)
    ids, start = sequence[:, 7:11], 7
    x, stats = decode_kernels.embed(ids, tokens_, positions, start)
    expected = (F.embedding(ids, tokens_) + positions[start : start + 4]).reshape(12, 24)
    assert torch.equal(x, expected)
    normed = F.layer_norm(x.float(), (24,), gain.float(), shift.float(), 1e-5).to(dtype)
    out = decode_kernels.linear(guarded(x), w, norm=(gain, shift, 1e-5, guarded(stats)))
    close(out, F.linear(normed.float(), w.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_product_writes_the_cache_and_attention_reads_it(dtype, tiling):
    """The q/k/v product writes keys and values at [start, start + tokens) of each sequence and head, and leaves the
    rest of the cache as it was; attention over [0, end) in one program (end <= 128) or in splits (the last program
    of a head joins them) equals SDPA. head_dim 12 is not a power of two, as the 700M model's 96. The cache past the
    block holds NaN, as does the memory around every input: a read there would show in the result."""
    B, tokens, heads, head_dim, length, start = 2, 5, 3, 12, 400, 300
    D, end = heads * head_dim, start + tokens
    g = torch.Generator().manual_seed(1)
    kv = guarded(torch.randn((2, B, heads, length, head_dim), generator=g).to(DEVICE, dtype))
    kv[:, :, :, end:] = float("nan")
    x = guarded(torch.randn((B * tokens, D), generator=g).to(DEVICE, dtype))
    w, b = (guarded(torch.randn(shape, generator=g).div(8).to(DEVICE, dtype)) for shape in ((3 * D, D), (3 * D,)))
    q_k_v = F.linear(x.float(), w.float(), b.float()).view(B, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    expected = kv.clone()
    expected[:, :, :, start:end] = q_k_v[1:].to(dtype)
    q = guarded(decode_kernels.linear(x, w, b, qkv=(tokens, start, D, head_dim), kv=kv))
    close(q, q_k_v[0].transpose(1, 2).reshape(B * tokens, D), dtype)
    close(kv[:, :, :, :end], expected[:, :, :, :end], dtype)
    assert torch.equal(kv[:, :, :, :start], expected[:, :, :, :start])
    assert kv[:, :, :, end:].isnan().all() and guard_intact(kv)
    counters = torch.zeros(B * heads, dtype=torch.int32, device=DEVICE)
    for end in (end, 100, end):  # three splits, one; the counters are back at zero after a launch
        out = decode_kernels.attention(q, kv, tokens, end, head_dim**-0.5, counters)
        assert not counters.any()
        reference = F.scaled_dot_product_attention(q.float().view(B, tokens, heads, head_dim).transpose(1, 2),
                                                   kv[0, :, :, :end].float(), kv[1, :, :, :end].float(),
                                                   scale=head_dim**-0.5)
        close(out, reference.transpose(1, 2).reshape(B * tokens, D), dtype)


@pytest.mark.parametrize("end", [130, 290])
@pytest.mark.parametrize("programs", [6, 12, 10**6], ids=["one program per head", "few per head", "chunks of 128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_reads_the_block_in_the_qkv_rows_and_writes_the_cache(dtype, programs, end, monkeypatch):
    """Attention as the PyTorch step calls it (`compile_decode="triton-attention"`): the block's queries, keys and
    values in the q/k/v product's rows (q | k | v), its keys and values written into the cache by the kernel, the
    rest of the cache left as it was. A launch that would exceed ATTENTION_PROGRAMS programs (B * heads = 6 here)
    gives each program a longer run of keys instead, down to one program per head. The block's 4 positions lie
    across two programs' runs of keys (end 130 in chunks of 128) or across two blocks of 32 keys of one program.
    The cache past the block holds NaN, as does the memory around every input."""
    monkeypatch.setattr(decode_kernels, "ATTENTION_PROGRAMS", programs)
    B, tokens, heads, head_dim = 2, 4, 3, 12
    D, start = heads * head_dim, end - tokens
    g = torch.Generator().manual_seed(4)
    kv = guarded(torch.randn((2, B, heads, 320, head_dim), generator=g).to(DEVICE, dtype))
    kv[:, :, :, start:] = float("nan")
    rows = guarded(torch.randn((B * tokens, 3 * D), generator=g).to(DEVICE, dtype))
    expected = kv.clone()
    expected[:, :, :, start:end] = rows.view(B, tokens, 3, heads, head_dim)[:, :, 1:].permute(2, 0, 3, 1, 4)
    counters = torch.zeros(B * heads, dtype=torch.int32, device=DEVICE)
    out = decode_kernels.attention(rows, kv, tokens, end, head_dim**-0.5, counters, new_kv=True)
    assert torch.equal(kv[:, :, :, :end], expected[:, :, :, :end]) and not counters.any()
    assert kv[:, :, :, end:].isnan().all() and guard_intact(kv)
    q = rows[:, :D].reshape(B, tokens, heads, head_dim).transpose(1, 2)
    reference = F.scaled_dot_product_attention(q.float(), kv[0, :, :, :end].float(), kv[1, :, :, :end].float(),
                                               scale=head_dim**-0.5)
    assert out.shape == (B * tokens, D) and out.dtype == dtype
    close(out, reference.transpose(1, 2).reshape(B * tokens, D), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampling", [dict(top_k=100, top_p=0.9), dict(top_k=100), dict(top_p=0.5, temperature=0.7),
                                      dict(top_k=1)])
def test_fused_sampler_gives_the_tokens_of_the_plain_one(dtype, sampling):
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn((4, 6, 300), generator=g)).to(DEVICE, dtype)
    noise = torch.rand((4, 6), generator=g).to(DEVICE)
    plain = generation.sample_tokens(logits, noise=noise, **sampling)
    fused = generation.sample_tokens(logits, noise=noise, fused=True, **sampling)
    assert fused.dtype == plain.dtype and torch.equal(fused, plain)


def test_sampling_values_on_the_device_give_the_tokens_of_numbers():
    # a static decoder passes its temperature and top-p as device scalars (so that its graphs serve any value)
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn((3, 4, 300), generator=g)).to(DEVICE)
    noise = torch.rand((3, 4), generator=g).to(DEVICE)
    on_device = lambda x: torch.tensor(x, device=DEVICE)  # noqa: E731
    for temperature, top_p in ((0.6, 0.8), (1.7, 0.95), (1e-40, 0.5)):
        plain = generation.sample_tokens(logits, temperature, 100, top_p, noise=noise)
        for fused in (False, True):
            tokens = generation.sample_tokens(logits, on_device(temperature), 100, on_device(top_p), noise=noise,
                                              fused=fused)
            assert torch.equal(tokens, plain)


def test_strided_inputs_are_read_as_their_values():
    # the kernels read dense rows: a strided view (a column of a wider table) must be copied, not misread
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn((4, 1, 300), generator=g)).to(DEVICE)
    noise = torch.rand((4, 5), generator=g).to(DEVICE)[:, :1]
    assert torch.equal(generation.sample_tokens(logits, top_k=100, top_p=0.9, noise=noise, fused=True),
                       generation.sample_tokens(logits, top_k=100, top_p=0.9, noise=noise))
    # logits of some positions of a block at batch 1: the final norm's statistics of those positions only
    model = make_model(block=(1, 1, 4), first_block="bov").to(DEVICE)
    P, S = model.layout.prefix_length, model.layout.block_size
    seq = model.config.video_token_offset + torch.randint(0, 40, (1, P + 2 * S), generator=g).to(DEVICE)
    logits = {}
    with torch.no_grad():
        for mode in (None, "triton"):
            cache = generation.BlockKVCache(model, 1)
            cache.reset(model)
            model.decode_block_logits(cache, seq[:, : P + S], 0, slice(P, P + S), None,
                                      mask=model.layout.allowed(0, P + S))
            logits[mode] = model.decode_block_logits(cache, seq[:, P + S :], P + S, slice(1, 3), mode)
    torch.testing.assert_close(logits["triton"], logits[None], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block,first_block,guidance,mode", [((1, 1, 4), "hybrid", 1.0, "triton"),
                                                             ((1, 4, 4), "bov", 2.5, "triton"),
                                                             ((1, 4, 4), "bov", 2.5, "triton-attention")])
def test_triton_decode_gives_the_reference_tokens(block, first_block, guidance, mode):
    model = make_model(block=block, first_block=first_block).to(DEVICE)
    kw = dict(class_labels=[0, 2], top_k=20, top_p=0.9, guidance_scale=guidance)
    fast = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), cache_implementation="static",
                                       compile_decode=mode, **kw)
    reference = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(fast, reference)


def test_triton_decode_replayed_from_graphs_gives_the_reference_tokens(replay_graphs):
    # graphs stood in by re-running the recorded step on its static inputs (see test_modeling_nbp)
    model = make_model(block=(1, 4, 4), first_block="bov").to(DEVICE)
    kw = dict(class_labels=[0, 2], top_k=20, top_p=0.9, guidance_scale=3.0)
    reference = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    for call in range(2):  # captured in the first call, replayed in both
        fast = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), cache_implementation="static",
                                           compile_decode="triton", **kw)
        assert torch.equal(fast, reference)
    assert replay_graphs and all(graph.replays for graph in replay_graphs)


@pytest.mark.parametrize("mode", ["triton", "triton-attention"])
def test_triton_steps_never_read_a_result_on_the_host(mode, replay_graphs, monkeypatch):
    """The captured Triton steps (the prefill runs the PyTorch parts) hold no operator whose result the host reads."""
    model = make_model(block=(1, 4, 4), first_block="bov").to(DEVICE)
    assert captured_host_reads(model, monkeypatch, compile_decode=mode) == [] and replay_graphs


def test_triton_decode_in_half_precision_gives_the_static_tokens():
    model = make_model(block=(1, 1, 4), first_block="hybrid").to(DEVICE, torch.float16)
    for sampling in (dict(top_k=20, top_p=0.9), dict(temperature=0.0, guidance_scale=2.0)):
        plain, triton = (model.generate_video_tokens(class_labels=[0, 2], generator=torch.Generator().manual_seed(1),
                                                     cache_implementation="static", compile_decode=mode, **sampling)
                         for mode in (False, "triton"))
        assert torch.equal(plain, triton)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_steps_in_half_precision_are_as_close_to_float32_as_the_pytorch_step(dtype):
    """Every step's logits (bfloat16 is the 700M model's dtype), all paths fed the same tokens: sampled tokens may
    differ by a rounding, so what is checked is the error against the float32 step, here about one unit of the
    dtype's precision. The kernels keep float32 where the PyTorch step rounds (the normalised rows, the attention's
    inputs), so they are no further from float32 than it is."""
    model = make_model(block=(1, 1, 4), first_block="hybrid").to(DEVICE)
    kw = dict(class_labels=[0, 2])
    forced = model.layout.grid_to_sequence(model.generate_video_tokens(temperature=0.0, **kw))
    reference = forced_step_logits(model, forced, **kw)
    model.to(dtype)
    error = {mode: max(float((a - b).abs().max() / b.abs().max())
                       for a, b in zip(forced_step_logits(model, forced, compile_decode=mode, **kw), reference,
                                       strict=True)) / torch.finfo(dtype).eps
             for mode in (None, "triton", "triton-attention")}
    assert 0 < error[None] < 2, error
    assert error["triton"] <= 1.1 * error[None] and error["triton-attention"] <= 1.1 * error[None], error


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on NaN
def test_the_head_product_flags_values_that_are_not_finite(tiling):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn((3, 24), generator=g).to(DEVICE), torch.randn((70, 24), generator=g).to(DEVICE)
    flag = torch.zeros((), dtype=torch.bool, device=DEVICE)
    decode_kernels.linear(x, w, nonfinite=flag)
    assert not flag
    for bad in (float("nan"), float("inf")):
        w[65, 7] = bad  # in the last column block
        decode_kernels.linear(x, w, nonfinite=flag)
        assert flag
        flag.zero_()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on NaN
def test_triton_decode_reports_nan_logits():
    # NaN at the last position fed (the last block is only sampled): the prefill is clean, so the Triton step's head
    # must report it
    model = make_model(block=(1, 4, 4), first_block="bov").to(DEVICE)
    kw = dict(class_labels=[0], top_k=20, cache_implementation="static", compile_decode="triton")
    model.generate_video_tokens(**kw)
    with torch.no_grad():
        model.model.embed_positions.weight[model.layout.sequence_length - model.config.block_size - 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite logits"):
        model.generate_video_tokens(**kw)


def test_triton_decode_never_skips_hooks_on_the_embedding_or_the_final_norm():
    # the PyTorch static step calls these two modules; the Triton one reads their weights
    model = make_model().to(DEVICE)
    hook = model.model.norm.register_forward_hook(lambda module, args, out: out)
    try:
        assert model.static_decode_blockers() == []
        assert model.static_decode_blockers(triton=True) == ["model.norm has a forward hook"]
        with pytest.raises(ValueError, match="model.norm has a forward hook"):
            model.generate_video_tokens(class_labels=[0], cache_implementation="static", compile_decode="triton")
    finally:
        hook.remove()


@pytest.mark.parametrize("mode", ["triton", "triton-attention"])
def test_triton_decode_needs_cuda_or_the_interpreter(mode, monkeypatch):
    model = make_model().to(DEVICE)
    with pytest.raises(ValueError, match="compile_decode needs"):
        model.generate_video_tokens(class_labels=[0], cache_implementation="dynamic", compile_decode=mode)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=f"compile_decode='{mode}' runs on a CUDA device"):
            model.generate_video_tokens(class_labels=[0], cache_implementation="static", compile_decode=mode)


def test_every_kernel_compiles_for_the_h100_without_spilling(tmp_path):
    """What the interpreter cannot check: the kernels of a 700M batch-1 step (bf16, every candidate tiling) and the
    training loss's and the tokenizer's norm kernels compile for sm_90 (Triton's own compiler and ptxas, no GPU
    needed), and no thread spills registers to local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "benchmarks/compile_kernels.py", "--arch", "90"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = run.stdout.splitlines()[1:]
    # the products in every tiling; attention (4 variants), embedding, sampler; the loss, with and without its
    # gradient; the tokenizer's two norm kernels in two memory layouts
    assert len(rows) == 5 * len(decode_kernels._TILINGS) + 6 + 2 + 4
    assert all(int(row.split()[-3]) == 0 for row in rows), run.stdout  # spilled bytes
    # the kernels whose programs join their parts (split products, split attention) compile to an ordered join
    joins = [row.split()[-1] for row in rows if "split" in row]
    assert len(joins) == 5 * sum(t[-1] > 1 for t in decode_kernels._TILINGS) + 2
    assert set(joins) == {"ok"} and {row.split()[-1] for row in rows if "split" not in row} == {"-"}, run.stdout


def test_join_order_flags_an_unordered_join():
    """compile_kernels.join_order, on PTX written here: a join is ordered only with a CTA barrier between the
    parts' stores and an acq_rel atomic, and the parts read past L1."""
    script = """
import sys
sys.path.insert(0, "benchmarks")
from compile_kernels import join_order
store = "st.global.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };"
atom = "@%p1 atom.global.gpu.acq_rel.add.u32 %r5, [ %rd2 + 0 ], %r6;"
read = "ld.global.cg.v4.b32 { %r7, %r8, %r9, %r10 }, [ %rd3 + 0 ];"
for ptx in ([store, "bar.sync 0;", atom, read], [store, atom, "bar.sync 0;", read], [store, "bar.sync 0;", atom],
            [store, "bar.sync 0;", atom.replace("acq_rel", "relaxed"), read], [store, read]):
    print(join_order("\\n".join(ptx)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["ok", "no bar.sync between the parts' stores and the atomic",
                                       "the parts are not read with ld.global.cg",
                                       "atomic not acq_rel at GPU scope: " + "@%p1 atom.global.gpu.relaxed.add.u32 "
                                       "%r5, [ %rd2 + 0 ], %r6;", "-"]
