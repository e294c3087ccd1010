"""Triton kernels for the static decode step at small batch (`compile_decode="triton"`), and its attention and
sampler alone for large batches (`compile_decode="triton-attention"`).

A decode step at batch 1 feeds 16 positions through 24 layers: every matrix product has 16 rows, so the step is
bound by reading the weights and by the number of kernels, not by arithmetic. Here a layer is 5 kernels instead of
the ~16 of the PyTorch step: the q/k/v product, whose epilogue writes the keys and values straight into the block
cache; attention over the filled cache, split over the keys (the last program of a head to finish joins the
partial sums); the attention projection with bias and residual; fc1 with bias and exact GELU; fc2 with bias and
residual. The layer norms have no kernel of their own: a product that writes the residual stream also writes the
row statistics of its column block (count, mean, squared deviations), and the product that reads the stream next
joins them and normalises its input tiles as it loads them. The products read the weights once per 64 rows (meant
for up to a few sequences; larger batches are better served by cuBLAS, as in "triton-attention"). After the top-k, the
sampling is one kernel per row (`sample_ranked`), and the step's input (token and position embeddings) one kernel
that also writes its row statistics.

The same function as the PyTorch step up to float rounding (products accumulate in float32 and the epilogue rounds
once). Runs on CUDA, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before this module is
imported), which is how the tests check it."""

import os

import torch
try:  # the remote-code loaders check the imports outside try blocks: a saved folder carries this file and loads
    import triton  # without triton; the kernels need it when they run
    import triton.language as tl
except ImportError as error:
    raise ImportError("this project's Triton kernels need the triton package (pip install triton; CUDA builds of "
                      "torch bring it)") from error

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _linear_epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, y_ptr, kv_ptr, stride_r, stride_y, tokens, start, D, head_dim,
                     kv_s0, kv_s1, kv_s2, kv_s3, stats_out_ptr, flag_ptr, BIAS: tl.constexpr, GELU: tl.constexpr,
                     RESIDUAL: tl.constexpr, QKV: tl.constexpr, STATS: tl.constexpr, FLAG: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    row_ok, col_ok = rm < M, rn < N
    if BIAS:
        acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    mask = row_ok[:, None] & col_ok[None, :]
    if RESIDUAL:
        acc += tl.load(r_ptr + rm[:, None] * stride_r + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    out = acc.to(y_ptr.dtype.element_ty)
    if FLAG:
        value = out.to(tl.float32)
        bad = tl.sum(((value != value) | (tl.abs(value) == float("inf"))) & mask, axis=1)
        tl.store(flag_ptr + tl.zeros((BLOCK_M,), dtype=tl.int32), tl.full((BLOCK_M,), 1, dtype=tl.uint8), mask=bad > 0)
    if STATS:  # of the stored (rounded) values, for the layer norm that reads y next
        v = tl.where(col_ok[None, :], out.to(tl.float32), 0.0)
        count = tl.sum(col_ok.to(tl.float32), axis=0)
        part_mean = tl.sum(v, axis=1) / count
        deviation = tl.where(col_ok[None, :], v - part_mean[:, None], 0.0)
        at = stats_out_ptr + tl.program_id(0) * 3 * M + rm
        tl.store(at, tl.zeros((BLOCK_M,), dtype=tl.float32) + count, mask=row_ok)
        tl.store(at + M, part_mean, mask=row_ok)
        tl.store(at + 2 * M, tl.sum(deviation * deviation, axis=1), mask=row_ok)
    if QKV:
        which = rn // D  # 0 q, 1 k, 2 v
        head, d = (rn % D) // head_dim, rn % head_dim
        is_q = which == 0
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], out, mask=mask & is_q[None, :])
        col_off = (which - 1) * kv_s0 + head * kv_s2 + d
        row_off = (rm // tokens) * kv_s1 + (start + rm % tokens) * kv_s3
        tl.store(kv_ptr + row_off[:, None] + col_off[None, :], out, mask=mask & ~is_q[None, :])
    else:
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], out, mask=mask)


@triton.jit(do_not_specialize=["start"])  # one compilation for every step
def _linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, kv_ptr, M, N, K, stride_x, stride_w, stride_r, stride_y,
                   tokens, start, D, head_dim, kv_s0, kv_s1, kv_s2, kv_s3,
                   ln_w_ptr, ln_b_ptr, stats_in_ptr, slices_in, eps, stats_out_ptr, flag_ptr, part_ptr, counter_ptr,
                   BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr, QKV: tl.constexpr,
                   NORM: tl.constexpr, STATS: tl.constexpr, FLAG: tl.constexpr, SLICES: tl.constexpr,
                   PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = f(x) @ w.T (+ b), then GELU or + r, where f is the identity or (NORM) the layer norm of x's rows with the
    row statistics in stats_in (slices_in, 3, M): per slice of columns its count, mean and sum of squared
    deviations, which the product that made x wrote (STATS: this product writes those of y, one slice per program
    column). FLAG: sets flag (one byte) when a value of y is NaN or infinite. QKV: the columns are q | k | v (D
    each); q goes to y (M, D), keys and values to the block cache kv (2, B, heads, length, head_dim) at positions
    start + row % tokens.
    SPLIT_K > 1: the programs of a tile share out K; each writes its float32 sums to part (tiles, SPLIT_K, BLOCK_M,
    BLOCK_N) and counts itself in counter[tile]; the last to finish adds the parts in order (the result does not
    depend on the timing), sets the counter back to 0 and runs the epilogue."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rm < M, rn < N
    if NORM:  # join the slices' statistics (Chan et al.): mean and 1 / std of each row
        sl = tl.arange(0, SLICES)
        at = stats_in_ptr + sl[:, None] * 3 * M + rm[None, :]
        ok = (sl[:, None] < slices_in) & row_ok[None, :]
        count = tl.load(at, mask=ok, other=0.0)
        part_mean = tl.load(at + M, mask=ok, other=0.0)
        mean = tl.sum(count * part_mean, axis=0) / K
        deviation = part_mean - mean[None, :]
        m2 = tl.sum(tl.load(at + 2 * M, mask=ok, other=0.0) + count * deviation * deviation, axis=0)
        rstd = 1.0 / tl.sqrt(m2 / K + eps)
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = tl.program_id(2) * per_split
    k_hi = tl.minimum(k_lo + per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # as F.layer_norm, rounded to the input's dtype before the product
            g = tl.load(ln_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            h = tl.load(ln_b_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            x = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + h[None, :]).to(x.dtype)
        w = tl.load(w_ptr + rn[:, None] * stride_w + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if SPLIT_K == 1:
        _linear_epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, y_ptr, kv_ptr, stride_r, stride_y, tokens, start, D,
                         head_dim, kv_s0, kv_s1, kv_s2, kv_s3, stats_out_ptr, flag_ptr, BIAS, GELU, RESIDUAL, QKV,
                         STATS, FLAG, BLOCK_M)
    else:
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        i, j = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
        part = part_ptr + ((tile * SPLIT_K + tl.program_id(2)) * BLOCK_M + i)[:, None] * BLOCK_N + j[None, :]
        tl.store(part, acc)
        # release: the part above is visible to whichever program counts last; acquire: that one sees them all
        if tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.store(counter_ptr + tile, 0)
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s_ in range(0, SPLIT_K):
                total += tl.load(part_ptr + ((tile * SPLIT_K + s_) * BLOCK_M + i)[:, None] * BLOCK_N + j[None, :],
                                 cache_modifier=".cg")
            _linear_epilogue(total, rm, rn, M, N, b_ptr, r_ptr, y_ptr, kv_ptr, stride_r, stride_y, tokens, start, D,
                             head_dim, kv_s0, kv_s1, kv_s2, kv_s3, stats_out_ptr, flag_ptr, BIAS, GELU, RESIDUAL, QKV,
                             STATS, FLAG, BLOCK_M)


@triton.jit
def _attend(q, k, v, p_ok, m_i, l_i, acc, scale, PRECISION: tl.constexpr):
    """One block of keys and values into the running softmax of `_attention_kernel` -> (m_i, l_i, acc)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(p_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    weights = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(weights, axis=1)
    acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["end"])
def _attention_kernel(q_ptr, kv_ptr, acc_ptr, stats_ptr, counter_ptr, out_ptr, tokens, heads, end, head_dim, scale,
                      stride_q, kv_s0, kv_s1, kv_s2, kv_s3, CHUNK, splits,
                      BLOCK_Q: tl.constexpr, BLOCK_KEYS: tl.constexpr, HEAD: tl.constexpr, PRECISION: tl.constexpr,
                      SPLIT: tl.constexpr, NEW_KV: tl.constexpr):
    """Attention of one sequence's `tokens` queries of one head over the keys [split * CHUNK, +CHUNK) ∩ [0, end),
    into out (B * tokens, D). NEW_KV: the fed block's keys and values, positions [end - tokens, end), are not in
    the cache yet but in each query row after its queries (q | k | v, D columns each); the program whose keys they
    are reads them there, after the cached ones, and writes them into the cache.
    SPLIT (several programs per head): each writes its unnormalised float32 sums to acc
    (B * heads, splits, BLOCK_Q, HEAD) and its running max and sum to stats (B * heads, splits, 2, BLOCK_Q), then
    counts itself in counter[b * heads + h]; the last one to finish joins the splits in their order (so the result
    does not depend on which finished last) and sets the counter back to 0 for the next launch."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    t = tl.arange(0, BLOCK_Q)
    d = tl.arange(0, HEAD)
    t_ok, d_ok = t < tokens, d < head_dim
    q = tl.load(q_ptr + (b * tokens + t)[:, None] * stride_q + h * head_dim + d[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = kv_ptr + b * kv_s1 + h * kv_s2
    D = heads * head_dim
    start = end - tokens
    m_i = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, HEAD), dtype=tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, end)
    cached_hi = tl.minimum(hi, start) if NEW_KV else hi
    for p0 in range(lo, cached_hi, BLOCK_KEYS):
        p = p0 + tl.arange(0, BLOCK_KEYS)
        p_ok = p < cached_hi
        k_at = k_base + p[:, None] * kv_s3 + d[None, :]
        kv_mask = p_ok[:, None] & d_ok[None, :]
        k = tl.load(k_at, mask=kv_mask, other=0.0)
        v = tl.load(k_at + kv_s0, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _attend(q, k, v, p_ok, m_i, l_i, acc, scale, PRECISION)
    if NEW_KV:
        fresh_lo = tl.maximum(lo, start)
        if fresh_lo < hi:  # the block's own keys (at most BLOCK_Q of them) fall in this program's run
            p = fresh_lo + tl.arange(0, BLOCK_Q)
            p_ok = p < hi
            kv_mask = p_ok[:, None] & d_ok[None, :]
            row_at = q_ptr + (b * tokens + p - start)[:, None] * stride_q + h * head_dim + d[None, :]
            k = tl.load(row_at + D, mask=kv_mask, other=0.0)
            v = tl.load(row_at + 2 * D, mask=kv_mask, other=0.0)
            k_at = k_base + p[:, None] * kv_s3 + d[None, :]
            tl.store(k_at, k, mask=kv_mask)
            tl.store(k_at + kv_s0, v, mask=kv_mask)
            m_i, l_i, acc = _attend(q, k, v, p_ok, m_i, l_i, acc, scale, PRECISION)
    out_at = out_ptr + (b * tokens + t)[:, None] * D + h * head_dim + d[None, :]
    out_mask = t_ok[:, None] & d_ok[None, :]
    if not SPLIT:
        tl.store(out_at, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = bh * splits + split
        tl.store(acc_ptr + (part * BLOCK_Q + t)[:, None] * HEAD + d[None, :], acc)
        tl.store(stats_ptr + part * 2 * BLOCK_Q + t, m_i)
        tl.store(stats_ptr + part * 2 * BLOCK_Q + BLOCK_Q + t, l_i)
        # release: the sums above are visible to whichever program counts last; acquire: that one sees them all
        if tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel") == splits - 1:
            tl.store(counter_ptr + bh, 0)
            first = bh * splits
            m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
            for s_ in range(0, splits):
                m = tl.maximum(m, tl.load(stats_ptr + (first + s_) * 2 * BLOCK_Q + t, cache_modifier=".cg"))
            total = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            joined = tl.zeros((BLOCK_Q, HEAD), dtype=tl.float32)
            for s_ in range(0, splits):
                at = stats_ptr + (first + s_) * 2 * BLOCK_Q + t
                # every split lies inside [0, end), so each has keys and a finite max
                w = tl.exp(tl.load(at, cache_modifier=".cg") - m)
                total += w * tl.load(at + BLOCK_Q, cache_modifier=".cg")
                joined += w[:, None] * tl.load(acc_ptr + ((first + s_) * BLOCK_Q + t)[:, None] * HEAD + d[None, :],
                                               cache_modifier=".cg")
            tl.store(out_at, (joined / total[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _sample_ranked_kernel(values_ptr, index_ptr, noise_ptr, out_ptr, k, inverse_temperature_ptr, top_p_ptr, stride_v,
                          stride_i, TEMPERATURE: tl.constexpr, TOP_P: tl.constexpr, BLOCK: tl.constexpr):
    """One row of `generation.sample_tokens` after its ranking: the k kept logits, largest first, with their ids.
    1 / temperature and top_p are read from device memory (a captured graph serves any value)."""
    row = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    ok = j < k
    logits = tl.load(values_ptr + row * stride_v + j, mask=ok, other=float("-inf")).to(tl.float32)
    if TEMPERATURE:  # shifted first, as in `sample_tokens`
        logits = (logits - tl.max(logits, axis=0)) * tl.load(inverse_temperature_ptr)
    e = tl.exp(logits - tl.max(logits, axis=0))
    probs = e / tl.sum(e, axis=0)
    cumulative = tl.cumsum(probs, axis=0)
    last = k - 1
    if TOP_P:  # the kept tokens: those with at most top_p of the probability ranked above them (a prefix)
        last = tl.maximum(tl.sum(((cumulative - probs <= tl.load(top_p_ptr)) & ok).to(tl.int32), axis=0), 1) - 1
    total = tl.sum(tl.where(j == last, cumulative, 0.0), axis=0)
    target = tl.load(noise_ptr + row) * total
    # searchsorted(cumulative, target, right=True): how many cumulative sums are <= target
    choice = tl.minimum(tl.sum(((cumulative <= target) & ok).to(tl.int32), axis=0), k - 1)
    tl.store(out_ptr + row, tl.load(index_ptr + row * stride_i + choice))


MAX_RANKED = 16384  # the fused sampler holds a row's kept logits in one program (the paper's top-k is 16000)


def sample_ranked(values: torch.Tensor, index: torch.Tensor, noise: torch.Tensor, inverse_temperature,
                  top_p) -> torch.Tensor:
    """The sampling that `generation.sample_tokens` does after its top-k (or sort), fused: `values` (..., k) the
    kept logits largest first, `index` (..., k) their ids, `noise` (...) one uniform number per row -> ids (...).
    `inverse_temperature` (None: temperature 1) and `top_p` (None: 1) are numbers or float32 device scalars."""
    k = values.shape[-1]
    rows = values.reshape(-1, k)
    ids = index.reshape(-1, k)
    out = torch.empty(rows.shape[0], dtype=index.dtype, device=values.device)

    def on_device(number):  # a fill, not a copy from the host: no synchronisation
        return number if torch.is_tensor(number) else torch.full((), number, dtype=torch.float32, device=values.device)

    _sample_ranked_kernel[(rows.shape[0],)](rows, ids, noise.reshape(-1).float().contiguous(), out, k,
                                            on_device(1.0 if inverse_temperature is None else inverse_temperature),
                                            on_device(1.0 if top_p is None else top_p), rows.stride(0), ids.stride(0),
                                            TEMPERATURE=inverse_temperature is not None, TOP_P=top_p is not None,
                                            BLOCK=max(16, triton.next_power_of_2(k)), num_warps=16)
    return out.view(values.shape[:-1])


@triton.jit(do_not_specialize=["start"])
def _embed_kernel(ids_ptr, token_ptr, position_ptr, x_ptr, stats_ptr, tokens, start, M, D, stride_ids_b,
                  stride_ids_t, stride_token, stride_position, BLOCK: tl.constexpr):
    """x[row] = token embedding of ids[b, t] + position embedding of start + t, where row = b * tokens + t (rounded
    once, as the PyTorch sum), and its statistics for the next layer norm (one slice: stats (1, 3, M))."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    token = tl.load(ids_ptr + (row // tokens) * stride_ids_b + (row % tokens) * stride_ids_t)
    position = start + row % tokens
    x = (tl.load(token_ptr + token * stride_token + cols, mask=ok, other=0.0).to(tl.float32)
         + tl.load(position_ptr + position * stride_position + cols, mask=ok, other=0.0).to(tl.float32))
    x = x.to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row * D + cols, x, mask=ok)
    v = x.to(tl.float32)
    mean = tl.sum(v, axis=0) / D
    centered = tl.where(ok, v - mean, 0.0)
    tl.store(stats_ptr + row, D * 1.0)
    tl.store(stats_ptr + M + row, mean)
    tl.store(stats_ptr + 2 * M + row, tl.sum(centered * centered, axis=0))


def embed(ids: torch.Tensor, token_weight: torch.Tensor, position_weight: torch.Tensor, start: int):
    """The decode step's input: ids (B, tokens) at positions [start, start + tokens) -> (x (B * tokens, D), the row
    statistics of x for `linear(norm=...)`)."""
    B, tokens = ids.shape
    D = token_weight.shape[1]
    x = token_weight.new_empty((B * tokens, D))
    stats = x.new_empty((1, 3, B * tokens), dtype=torch.float32)
    _embed_kernel[(B * tokens,)](ids, token_weight, position_weight, x, stats, tokens, start, B * tokens, D,
                                 *ids.stride(), token_weight.stride(0), position_weight.stride(0),
                                 BLOCK=triton.next_power_of_2(D))
    return x, stats


def _precision(dtype: torch.dtype) -> str:
    # float32 models get float32 products (no TF32), as the PyTorch path computes them
    return "ieee" if dtype == torch.float32 else "tf32"


# candidate tilings of the products, (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K): for a block of 16 rows (a
# step at batch 1) each one is compiled and timed once per shape on CUDA (`_tiling`); other row blocks, and the
# interpreter, take the first. Splitting K gives the narrow products (1536 columns: 48-96 column blocks) more
# programs than the GPU has multiprocessors.
_TILINGS = [(32, 128, 4, 4, 1), (16, 256, 4, 4, 1), (64, 128, 4, 4, 1), (32, 256, 8, 3, 1), (16, 128, 2, 5, 1),
            (16, 256, 4, 4, 2), (32, 128, 4, 4, 4)]
_chosen: dict = {}
# device -> int32 zeros, one per tile of a split product (the kernel leaves them at 0), largest last; none is ever
# freed, since a CUDA graph captured with one keeps using it
_split_counters: dict = {}


def _counters(device, tiles: int) -> torch.Tensor:
    kept = _split_counters.setdefault(device, [])
    if not kept or kept[-1].numel() < tiles:
        with torch.inference_mode(False):
            kept.append(torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device))
    return kept[-1]


def _launch_linear(tiling, x, w, b, r, y, kv, qkv, gelu, norm, stats, flag, block_m):
    block_n, block_k, warps, stages, split_k = tiling
    (M, K), N = x.shape, w.shape[0]
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split_k)
    tokens, start, D, head_dim = qkv if qkv is not None else (1, 0, N, N)
    kv_strides = kv.stride()[:4] if kv is not None else (0, 0, 0, 0)
    ln_w, ln_b, eps, stats_in = norm if norm is not None else (w, w, 0.0, w)
    slices_in = stats_in.shape[0] if norm is not None else 1
    part = counters = y
    if split_k > 1:
        tiles = grid[0] * grid[1]
        part = torch.empty((tiles * split_k * block_m * block_n,), dtype=torch.float32, device=x.device)
        counters = _counters(x.device, tiles)
    _linear_kernel[grid](x, w, b if b is not None else w, r if r is not None else y, y, kv if kv is not None else y,
                         M, N, K, x.stride(0), w.stride(0), r.stride(0) if r is not None else 0, y.stride(0),
                         tokens, start, D, head_dim, *kv_strides, ln_w, ln_b, stats_in, slices_in, eps,
                         stats if stats is not None else y, flag if flag is not None else y, part, counters,
                         BIAS=b is not None, GELU=gelu, RESIDUAL=r is not None, QKV=qkv is not None,
                         NORM=norm is not None, STATS=stats is not None, FLAG=flag is not None,
                         SLICES=max(2, triton.next_power_of_2(slices_in)), PRECISION=_precision(x.dtype),
                         SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                         num_stages=stages)


def _tiling(key, launch):
    """The fastest of `_TILINGS` for this shape (timed on the first call, outside any CUDA graph capture)."""
    if key not in _chosen:
        if INTERPRETED or key[0] != 16 or torch.cuda.is_current_stream_capturing():
            return _TILINGS[0]
        times = []
        for tiling in _TILINGS:
            launch(tiling)  # compile and warm up
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(10):
                launch(tiling)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        _chosen[key] = _TILINGS[times.index(min(times))]
    return _chosen[key]


def linear(x, weight, bias=None, residual=None, gelu=False, qkv=None, kv=None, norm=None, stats=False,
           nonfinite=None):
    """f(x) (M, K) @ weight (N, K).T (+ bias), then exact GELU (`gelu`) or + residual (M, N) -> (M, N).
    norm=(weight, bias, eps, statistics): f is the layer norm of x's rows, from the row statistics that the product
    which made x returned (stats=True: -> (y, its row statistics)); else f is the identity. `nonfinite`, a bool
    device scalar, is set when a value of y is NaN or infinite.
    qkv=(tokens, start, D, head_dim) with kv, a (2, B, heads, length, head_dim) cache: the product's columns are
    q | k | v; returns q (M, D) and writes the keys and values of row m into kv[:, m // tokens, :, start + m %
    tokens]."""
    M, K = x.shape
    N = weight.shape[0]
    y = x.new_empty((M, qkv[2] if qkv is not None else N))
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    key = (block_m, N, K, x.dtype, bias is not None, gelu, residual is not None, qkv is not None, norm is not None,
           stats, nonfinite is not None)
    flag = nonfinite.view(torch.uint8) if nonfinite is not None else None
    out = {}

    def launch(tiling):
        # the statistics have one slice per column block, so their shape follows the tiling
        out["stats"] = x.new_empty((triton.cdiv(N, tiling[0]), 3, M), dtype=torch.float32) if stats else None
        _launch_linear(tiling, x, weight, bias, residual, y, kv, qkv, gelu, norm, out["stats"], flag, block_m)

    launch(_tiling(key, launch))
    return (y, out["stats"]) if stats else y


# keys per program: at batch 1 a step of the K600 setting (up to 1280 keys) runs 16 heads x up to 10 programs; a
# launch of more than ATTENTION_PROGRAMS programs (batch 64: 1024 heads) gives each program a longer run of keys
# instead, down to one program per head (no partial sums to write and join)
ATTENTION_CHUNK = 128
ATTENTION_PROGRAMS = 1024
ATTENTION_BLOCK_KEYS = 32  # keys per iteration inside a program


def attention(q: torch.Tensor, kv: torch.Tensor, tokens: int, end: int, scale: float, counters: torch.Tensor,
              new_kv: bool = False) -> torch.Tensor:
    """q (B * tokens, >= D), each row's queries in its first D columns, against the keys and values
    kv[:, :, :, :end] (all visible: a decode step needs no mask) -> (B * tokens, D). `counters`: B * heads int32
    zeros, kept between calls (the kernel leaves them at zero). `new_kv`: q is the q/k/v product (B * tokens, 3 D)
    of the block fed at [end - tokens, end), whose keys and values the kernel writes into kv as it reads them."""
    _, B, heads, _, head_dim = kv.shape
    out = q.new_empty((q.shape[0], heads * head_dim))
    chunk, splits = ATTENTION_CHUNK, triton.cdiv(end, ATTENTION_CHUNK)
    if B * heads * splits > ATTENTION_PROGRAMS:  # enough heads to fill the GPU: longer chunks, fewer parts to join
        splits = max(1, ATTENTION_PROGRAMS // (B * heads))
        chunk = triton.cdiv(triton.cdiv(end, splits), ATTENTION_BLOCK_KEYS) * ATTENTION_BLOCK_KEYS
        splits = triton.cdiv(end, chunk)  # every split has keys
    block_q, head = max(16, triton.next_power_of_2(tokens)), max(16, triton.next_power_of_2(head_dim))
    acc = stats = out  # not read with one split
    if splits > 1:
        acc = torch.empty((B * heads * splits * block_q * head,), device=q.device, dtype=torch.float32)
        stats = torch.empty((B * heads * splits * 2 * block_q,), device=q.device, dtype=torch.float32)
    _attention_kernel[(B * heads, splits)](
        q, kv, acc, stats, counters, out, tokens, heads, end, head_dim, scale, q.stride(0), *kv.stride()[:4],
        chunk, splits, BLOCK_Q=block_q, BLOCK_KEYS=ATTENTION_BLOCK_KEYS, HEAD=head, PRECISION=_precision(q.dtype),
        SPLIT=splits > 1, NEW_KV=new_kv, num_warps=4)
    return out


def block_logits(model, cache, ids: torch.Tensor, start: int, keep: slice, nonfinite=None) -> torch.Tensor:
    """`NBPForVideoGeneration.decode_block_logits` through the kernels above (same arguments and result; the head's
    product checks the logits for `nonfinite`)."""
    m, cfg = model.model, model.config
    B, n = ids.shape
    end = start + n
    D = cfg.hidden_size
    head_dim = D // cfg.num_attention_heads
    x, stats = embed(ids, m.embed_tokens.weight, m.embed_positions.weight, start)
    for i, layer in enumerate(m.layers):
        norm, post, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
        q = linear(x, cache.qkv_weight[i], cache.qkv_bias[i], qkv=(n, start, D, head_dim), kv=cache.kv[i],
                   norm=(norm.weight, norm.bias, norm.eps, stats))
        o = attention(q, cache.kv[i], n, end, layer.self_attn.scaling, cache.split_counters)
        x, stats = linear(o, layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias, residual=x, stats=True)
        h = linear(x, mlp.fc1.weight, mlp.fc1.bias, gelu=True, norm=(post.weight, post.bias, post.eps, stats))
        x, stats = linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x, stats=True)
    head = model.lm_head.weight
    if not cfg.sample_whole_vocabulary:
        head = head[cfg.video_token_offset : cfg.video_token_offset + cfg.video_vocab_size]
    # the final norm inside the head's product, on the positions that give logits (all of them in a block step)
    S = stats.shape[0]
    x = x.view(B, n, D)[:, keep].reshape(-1, D)
    stats = stats.view(S, 3, B, n)[..., keep].reshape(S, 3, -1).contiguous()  # the kernel reads (S, 3, M) densely
    logits = linear(x, head, norm=(m.norm.weight, m.norm.bias, m.norm.eps, stats), nonfinite=nonfinite)
    return logits.view(B, -1, head.shape[0])
