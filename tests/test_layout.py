import pytest
import torch

from modeling_nbp import BlockLayout, NBPConfig


@pytest.mark.parametrize("block", [(1, 1, 1), (1, 1, 4), (1, 4, 4), (2, 1, 2), (3, 4, 4)])
def test_grid_sequence_round_trip(block):
    layout = BlockLayout((3, 4, 4) if block[0] != 2 else (4, 4, 4), block)
    grid = torch.randint(0, 100, (2, *layout.latent_shape), generator=torch.Generator().manual_seed(0))
    seq = layout.grid_to_sequence(grid)
    assert torch.equal(layout.sequence_to_grid(seq), grid)
    # every block is contiguous in the sequence: its tokens come from one (t, h, w) tile of the grid
    S = layout.block_size
    idx = layout.grid_to_sequence(torch.arange(grid[0].numel()).view(1, *layout.latent_shape))[0]
    T, H, W = layout.latent_shape
    t_, h_, w_ = idx // (H * W), idx // W % H, idx % W
    for b in range(layout.num_blocks):
        sl = slice(b * S, (b + 1) * S)
        for coord, size in zip((t_, h_, w_), block):
            assert len(set((coord[sl] // size).tolist())) == 1


def test_rows_and_frames_are_raster_order():
    for block in [(1, 1, 16), (1, 16, 16)]:
        layout = BlockLayout((5, 16, 16), block)
        grid = torch.arange(1280).view(1, 5, 16, 16)
        assert torch.equal(layout.grid_to_sequence(grid)[0], torch.arange(1280))


@pytest.mark.parametrize("latent,block", [((2, 4, 6), (1, 2, 3)), ((4, 4, 4), (2, 2, 1)), ((2, 4, 4), (2, 2, 2))])
def test_blocks_follow_in_raster_order_and_so_do_their_tokens(latent, block):
    """Several blocks per frame in both directions: the grid index of every sequence position, written out with loops
    (blocks over time, rows, columns; inside a block the same). A round trip alone holds for any order."""
    (T, H, W), (t, h, w) = latent, block
    layout = BlockLayout(latent, block)
    expected = [(bt * t + dt) * H * W + (bh * h + dh) * W + bw * w + dw
                for bt in range(T // t) for bh in range(H // h) for bw in range(W // w)
                for dt in range(t) for dh in range(h) for dw in range(w)]
    grid = torch.arange(T * H * W).view(1, T, H, W)
    sequence = layout.grid_to_sequence(grid)
    assert sequence[0].tolist() == expected
    # the first c latent frames (context, frames streamed as they complete) are the first c H' W' tokens
    for c in range(t, T + 1, t):
        assert torch.equal(layout.grid_to_sequence(grid[:, :c]), sequence[:, : c * H * W])
        assert torch.equal(layout.sequence_to_grid(sequence[:, : c * H * W]), grid[:, :c])


def test_official_step_counts():
    ucf = NBPConfig.from_preset("ucf-tiny")
    k600 = NBPConfig.from_preset("k600-tiny")
    assert len(BlockLayout.from_config(ucf).decode_schedule(0)) == 95
    k = BlockLayout.from_config(k600)
    assert len(k.decode_schedule(k.context_tokens(2))) == 48
    assert ucf.vocab_size == 96016 and ucf.video_token_offset == 32016 and ucf.num_condition_tokens == 8
    assert k600.vocab_size == 64000 and k600.video_token_offset == 0
    assert ucf.sequence_length == 8 + 16 + 1280 and BlockLayout.from_config(ucf).input_length == 1288


def official_hybrid_mask(prefix_len, seq_len, S):
    """The official hybrid mask, written from its description: causal, prefix columns visible to every row,
    and from prefix + S on, blocks of S that see every earlier block and themselves."""
    m = torch.tril(torch.ones(seq_len, seq_len))
    m[:, :prefix_len] = 1
    start = prefix_len + S
    for i in range(start, seq_len, S):
        m[i : i + S, start : i + S] = 1
    return m.bool()


def official_plain_mask(prefix_len, seq_len, S):
    m = torch.zeros(seq_len, seq_len)
    m[:, :prefix_len] = 1
    for i in range(prefix_len, seq_len, S):
        m[i : i + S, prefix_len : i + S] = 1
    return m.bool()


def test_masks_match_official_construction():
    hybrid = BlockLayout((5, 16, 16), (1, 1, 16), num_condition_tokens=8, first_block="hybrid")
    L = hybrid.input_length
    assert torch.equal(hybrid.allowed(0, L), official_hybrid_mask(8, L, 16))
    plain = BlockLayout((5, 16, 16), (1, 1, 16), first_block="none")
    L = plain.input_length
    assert torch.equal(plain.allowed(0, L), official_plain_mask(0, L, 16))


def test_hybrid_training_targets():
    S, P = 4, 2
    layout = BlockLayout((2, 2, 4), (1, 1, S), num_condition_tokens=P, first_block="hybrid", bov_token_id=0,
                         video_token_offset=100)
    grid = torch.arange(16).view(1, 2, 2, 4)
    inputs, labels = layout.training_inputs(torch.tensor([[50, 51]]), grid)
    v = [100 + i for i in range(16)]
    # [prefix][BOV][v0..v3][ph 1..3][v4..v11]  (v12..v15 is the last block: target only)
    assert inputs[0].tolist() == [50, 51, 0] + v[:4] + [1, 2, 3] + v[4:12]
    assert labels[0].tolist() == [-100, -100] + v
    # token by token over BOV, v0, v1, v2; then the block [v3, ph1, ph2, ph3]
    assert layout.decode_schedule(0)[:5] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 8)]


def test_plain_targets_shift_by_one_block():
    layout = BlockLayout((2, 2, 4), (1, 1, 4), first_block="none")
    inputs, labels = layout.training_inputs(torch.zeros(1, 0, dtype=torch.long), torch.arange(16).view(1, 2, 2, 4))
    assert inputs[0].tolist() == list(range(12))
    assert labels[0].tolist() == list(range(4, 16))


def test_frame_end_tracks_completed_frames():
    layout = BlockLayout((4, 2, 2), (2, 1, 2))
    # blocks span two frames: frame 0's last token is the 6th of the sequence, frame 1's the 8th
    assert layout.frame_end.tolist() == [6, 8, 14, 16]


@pytest.mark.parametrize("latent,block", [((5, 16, 16), (1, 3, 16)), ((5, 16, 16), (2, 1, 16))])
def test_non_tiling_block_is_rejected(latent, block):
    with pytest.raises(ValueError, match="does not tile"):
        NBPConfig(latent_shape=list(latent), block_shape=list(block), condition_mode="none", first_block="bov")


def test_bad_config_values():
    with pytest.raises(ValueError, match="condition_mode"):
        NBPConfig(condition_mode="text")
    with pytest.raises(ValueError, match="first_block"):
        NBPConfig(condition_mode="none", first_block="ntp")
    with pytest.raises(ValueError, match="first_block='none'"):
        NBPConfig(condition_mode="class", num_classes=3, first_block="none")
    with pytest.raises(ValueError, match="unknown preset"):
        NBPConfig.from_preset("ucf-9b")
    tiny = dict(condition_mode="none", first_block="bov", latent_shape=[2, 2, 2], block_shape=[1, 1, 2])
    with pytest.raises(ValueError, match="positive ints"):
        NBPConfig(**dict(tiny, latent_shape=[0, 2, 2]))
    with pytest.raises(ValueError, match="the transformer sizes must be positive ints"):
        NBPConfig(num_attention_heads=0, **tiny)
    with pytest.raises(ValueError, match=r"class_dropout_prob must lie in \[0, 1\]"):
        NBPConfig(class_dropout_prob=1.5, **tiny)
    with pytest.raises(ValueError, match="tie_word_embeddings must be False"):
        NBPConfig(tie_word_embeddings=True, **tiny)
    frames = dict(tiny, condition_mode="frames", first_block="none")
    with pytest.raises(ValueError, match=r"num_context_frames \(2\) must be .* in \[0, 2\)"):
        NBPConfig(num_context_frames=2, **frames)


def test_overrides_at_loading_are_checked_when_the_model_is_built(tmp_path):
    from modeling_nbp import NBPForVideoGeneration

    NBPForVideoGeneration(NBPConfig(num_classes=3, latent_shape=[2, 4, 4], block_shape=[1, 1, 4], hidden_size=32,
                                    num_hidden_layers=1, num_attention_heads=4)).save_pretrained(tmp_path)
    # the condition ids were placed after the 4-token hybrid start; 8-token blocks would overlap them
    with pytest.raises(ValueError, match=r"BOV/placeholder ids \[0, 8\) overlap the condition ids \[4, 7\)"):
        NBPForVideoGeneration.from_pretrained(tmp_path, block_shape=[1, 2, 4])


def test_token_id_ranges_are_kept_apart():
    small = dict(latent_shape=[2, 2, 2], block_shape=[1, 1, 2], first_block="hybrid", video_vocab_size=10)
    with pytest.raises(ValueError, match=r"class_condition_ids must lie in the condition range \[2, 12\)"):
        NBPConfig(class_condition_ids=[[1], [5]], condition_vocab_size=10, **small)  # id 1 is a placeholder
    with pytest.raises(ValueError, match=r"BOV/placeholder ids \[3, 5\) overlap the condition ids \[2, 5\)"):
        NBPConfig(num_classes=3, bov_token_id=3, **small)
    with pytest.raises(ValueError, match="condition ids .* overlap the video ids"):
        NBPConfig(num_classes=3, video_token_offset=3, **small)
    with pytest.raises(ValueError, match="do not fit in vocab_size"):
        NBPConfig(num_classes=3, vocab_size=8, **small)
    # given multi-token ids size the condition range; the video ids follow it
    cfg = NBPConfig(class_condition_ids=[[3, 4], [5, 6]], **small)
    assert (cfg.condition_token_offset, cfg.condition_vocab_size, cfg.video_token_offset) == (2, 5, 7)
    # the UCF text ids follow the special tokens of the chosen blocks (16 for the official 1x1x16 hybrid start)
    official, rows = NBPConfig.from_preset("ucf-tiny"), NBPConfig.from_preset("ucf-tiny", block_shape=[1, 1, 8])
    assert official.condition_token_offset == 16 and rows.condition_token_offset == 8
    assert [i - 8 for i in rows.class_condition_ids[5]] == [i - 16 for i in official.class_condition_ids[5]]


def test_the_step_plan_is_computed_once_per_context_and_cache_use():
    layout = BlockLayout((3, 4, 4), (1, 1, 4), num_condition_tokens=1, first_block="hybrid")
    plan = layout.step_plan(0, True)
    assert layout.step_plan(0, True) is plan and layout.step_plan(0, False) is not plan
    # hybrid start: 4 one-token steps, then one block (a row) per step, each fed after the previous step's positions
    assert [(a, b) for a, b, *_ in plan] == layout.decode_schedule(0)
    assert all(start == previous[3] for previous, (_, _, start, *_) in zip(plan, plan[1:]))
    assert all(keep_slice == slice(int(keep[0]), int(keep[-1]) + 1) for *_, keep, keep_slice in plan)
    # without a cache every step feeds the sequence from its start
    assert {start for _, _, start, *_ in layout.step_plan(0, False)} == {0}


@pytest.mark.parametrize("first_block", ["none", "bov", "hybrid"])
def test_needs_mask_is_false_exactly_when_the_positions_fed_see_each_other(first_block):
    layout = BlockLayout((2, 2, 4), (1, 1, 4), num_condition_tokens=2, first_block=first_block)
    L = layout.sequence_length
    for start in range(L):
        for end in range(start + 1, L + 1):
            free = bool(layout.allowed(start, end)[:, start:].all())  # every fed position sees all fed ones
            assert layout.needs_mask(start, end) == (not free), (start, end)
