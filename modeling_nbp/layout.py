"""BlockLayout: the one owner of where every token of an NBP sequence sits and what it may see.

The full sequence is `[prefix (P)][body]`, where the body depends on the first-block scheme (S = block size,
v_i = the i-th video token in block order):
- "none":   v_0 .. v_{N-1}                                  (first block given as context)
- "bov":    BOV x S, v_0 .. v_{N-1}                         (the BOV block predicts block 0)
- "hybrid": BOV, v_0 .. v_{S-1}, ph_1 .. ph_{S-1}, v_S ..   (the paper's start: token by token, then blocks)

Position p's logits predict the token at the same place one block later. For "bov" and "hybrid" that is
simply: position P + i predicts v_i. For "none": position P + i predicts v_{i+S}. Training reads the full
sequence without its last S positions. The attention mask is causal, plus bidirectional inside each group
of `block_ids` (the prefix is one group; the hybrid start's token-by-token positions have no group).
"""

import math

import torch


class BlockLayout:
    """The sequence layout of one model (`model.layout`): positions, targets, block ids and masks, decode plans (see
    the module docstring)."""

    def __init__(self, latent_shape, block_shape, num_condition_tokens=0, first_block="none", bov_token_id=0,
                 video_token_offset=0):
        with torch.device("cpu"):  # small index tables; models may be built under a meta-device context
            self._build(latent_shape, block_shape, num_condition_tokens, first_block, bov_token_id,
                        video_token_offset)
        self._plans = {}  # `step_plan`'s

    def _build(self, latent_shape, block_shape, num_condition_tokens, first_block, bov_token_id,
               video_token_offset):
        self.latent_shape = tuple(int(x) for x in latent_shape)
        self.block_shape = tuple(int(x) for x in block_shape)
        if any(b < 1 or g % b for g, b in zip(self.latent_shape, self.block_shape)):
            raise ValueError(f"block_shape {self.block_shape} does not tile latent_shape {self.latent_shape}")
        self.block_size = S = math.prod(self.block_shape)
        self.num_video_tokens = N = math.prod(self.latent_shape)
        self.num_blocks = N // S
        self.prefix_length = P = int(num_condition_tokens)
        self.first_block = first_block
        self.bov_token_id = bov_token_id
        self.video_token_offset = video_token_offset
        start = {"none": 0, "bov": S, "hybrid": S}[first_block]
        self.sequence_length = L = P + start + N
        self.input_length = L - S  # what training feeds: the last block is only a target

        i = torch.arange(N)
        if first_block == "none":
            self.video_positions = P + i
            self.target_positions = torch.where(i >= S, P + i - S, -1)
        elif first_block == "bov":
            self.video_positions = P + S + i
            self.target_positions = P + i
        else:  # hybrid: v_0..v_{S-1} follow BOV, then S-1 placeholders, then the rest
            self.video_positions = torch.where(i < S, P + 1 + i, P + S + i)
            self.target_positions = P + i

        # training labels: the video tokens (block order) that some position predicts, and those positions
        has_target = self.target_positions >= 0
        self.targeted_tokens = has_target.nonzero()[:, 0]
        self.targeting_positions = self.target_positions[has_target]

        # tokens of the body that are not video tokens: BOV block / BOV + placeholders
        self.start_positions, self.start_tokens = self._start_tokens()

        # mask groups: prefix = group 0, then one group per block; -1 = plain causal
        block_ids = torch.full((L,), -1, dtype=torch.long)
        block_ids[:P] = 0
        if first_block == "none":
            block_ids[P:] = 1 + torch.arange(N) // S
        elif first_block == "bov":
            block_ids[P:] = 1 + torch.arange(N + S) // S
        else:  # token-by-token over [BOV, v_0..v_{S-2}], then blocks starting at v_{S-1}
            block_ids[P + S:] = 1 + torch.arange(L - P - S) // S
        self.block_ids = block_ids
        self._block_id_list = tuple(block_ids.tolist())  # read by `needs_mask`, also while torch.compile traces

        # frame f is complete once the first `frame_end[f]` video tokens (block order) are known
        order = self.grid_to_sequence(torch.arange(N).view(1, *self.latent_shape))[0]  # seq index -> grid index
        seq_index_of_grid = torch.empty(N, dtype=torch.long)
        seq_index_of_grid[order] = torch.arange(N)
        self.frame_end = seq_index_of_grid.view(self.latent_shape[0], -1).max(dim=1).values + 1

    @classmethod
    def from_config(cls, config) -> "BlockLayout":
        return cls(config.latent_shape, config.block_shape, config.num_condition_tokens, config.first_block,
                   config.bov_token_id, config.video_token_offset)

    def _start_tokens(self):
        P, S = self.prefix_length, self.block_size
        if self.first_block == "none":
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        if self.first_block == "bov":
            return torch.arange(P, P + S), torch.full((S,), self.bov_token_id)
        placeholders = self.bov_token_id + torch.arange(1, S)  # official ids 1..15 after BOV 0
        positions = torch.cat([torch.tensor([P]), torch.arange(P + S + 1, P + 2 * S)])
        return positions, torch.cat([torch.tensor([self.bov_token_id]), placeholders])

    # ---- grid <-> sequence -------------------------------------------------------------------------
    def grid_to_sequence(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, T', H', W') -> (B, N) in block order (raster over blocks, raster inside a block). A grid of the
        first c latent frames (c a multiple of the block's time extent) gives the first c H' W' tokens."""
        (T, H, W), (t, h, w) = self.latent_shape, self.block_shape
        if grid.ndim != 4 or tuple(grid.shape[2:]) != (H, W) or grid.shape[1] > T or grid.shape[1] % t:
            raise ValueError(
                f"video token grid must have shape (batch, frames, {H}, {W}) with frames <= {T} and a multiple "
                f"of {t}; got {tuple(grid.shape)}"
            )
        B, frames = grid.shape[:2]
        x = grid.reshape(B, frames // t, t, H // h, h, W // w, w).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(B, -1)

    def sequence_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n) with n a whole number of latent frames' tokens -> (B, n / (H' W'), H', W')."""
        (_, H, W), (t, h, w) = self.latent_shape, self.block_shape
        B, n = tokens.shape
        frames = n // (H * W)
        if n % (H * W * t):
            raise ValueError(f"{n} tokens are not a whole number of {t}-frame block rows")
        x = tokens.reshape(B, frames // t, H // h, W // w, t, h, w).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, frames, H, W)

    # ---- sequences -----------------------------------------------------------------------------------
    def build_sequence(self, prefix_ids: torch.Tensor, video_ids: torch.Tensor) -> torch.Tensor:
        """prefix_ids (B, P) and video vocabulary ids (B, n) in block order -> the full sequence (B, L) in model
        vocabulary ids (video ids shifted by the offset), -1 at the video positions past the n given tokens."""
        B, n = video_ids.shape
        seq = torch.full((B, self.sequence_length), -1, dtype=torch.long, device=video_ids.device)
        seq[:, : self.prefix_length] = prefix_ids
        seq[:, self.start_positions.to(seq.device)] = self.start_tokens.to(seq.device)
        seq[:, self.video_positions[:n].to(seq.device)] = video_ids + self.video_token_offset
        return seq

    def training_inputs(self, prefix_ids: torch.Tensor, video_grid: torch.Tensor):
        """-> (input_ids, labels), both (B, L - S); labels hold the model-vocabulary id that each position
        predicts and -100 where a position predicts nothing (prefix, positions past the targets)."""
        if video_grid.ndim != 4 or tuple(video_grid.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"training takes whole video token grids (batch, {', '.join(map(str, self.latent_shape))})"
                             f"; got {tuple(video_grid.shape)}")
        if prefix_ids.shape[0] != video_grid.shape[0]:
            raise ValueError(f"got {prefix_ids.shape[0]} condition prefixes (class_labels) for {video_grid.shape[0]} "
                             "video grids")
        video = self.grid_to_sequence(video_grid)
        seq = self.build_sequence(prefix_ids, video)
        labels = torch.full_like(seq, -100)
        targets = video[:, self.targeted_tokens.to(seq.device)] + self.video_token_offset
        labels[:, self.targeting_positions.to(seq.device)] = targets
        return seq[:, : self.input_length], labels[:, : self.input_length]

    # ---- attention -----------------------------------------------------------------------------------
    def allowed(self, q_start: int, q_end: int) -> torch.Tensor:
        """Boolean (q_end - q_start, q_end) matrix: may query position q attend to key position k."""
        q = torch.arange(q_start, q_end)[:, None]
        k = torch.arange(q_end)[None, :]
        gq, gk = self.block_ids[q], self.block_ids[k]
        return (k <= q) | ((gq == gk) & (gq >= 0))

    def needs_mask(self, q_start: int, q_end: int) -> bool:
        """False when the positions fed at once may all see each other and every earlier one (a decode step
        of one block or one token), so attention needs no mask at all."""
        if q_end - q_start <= 1:
            return False
        # groups are runs of consecutive positions, so the first and last position tell
        g = self._block_id_list
        return not (g[q_start] >= 0 and g[q_start] == g[q_end - 1])

    # ---- generation ----------------------------------------------------------------------------------
    def context_tokens(self, num_context_frames: int) -> int:
        T, H, W = self.latent_shape
        if not 0 <= num_context_frames < T:
            raise ValueError(f"the number of context latent frames must be in [0, {T - 1}], got {num_context_frames}")
        if num_context_frames % self.block_shape[0]:
            raise ValueError(
                f"context of {num_context_frames} latent frames does not end on a block boundary: with "
                f"block_shape {self.block_shape} it must be a multiple of {self.block_shape[0]}"
            )
        return num_context_frames * H * W

    def decode_schedule(self, num_context_tokens: int = 0) -> list[tuple[int, int]]:
        """The ranges [a, b) of video tokens (block order) that each generation step produces."""
        S, N, c = self.block_size, self.num_video_tokens, num_context_tokens
        if self.first_block == "none" and c < S:
            raise ValueError("this model generates from context: give at least one block of context tokens")
        steps = []
        if self.first_block == "hybrid" and c == 0:
            steps = [(i, i + 1) for i in range(S)]
            c = S
        return steps + [(a, a + S) for a in range(c, N, S)]

    def step_positions(self, a: int, b: int) -> torch.Tensor:
        """Positions whose logits give video tokens [a, b)."""
        return self.target_positions[a:b]

    def step_plan(self, num_context_tokens: int, use_cache: bool) -> tuple:
        """Every generation step's inputs, computed once per (context, cache use) and kept (a call's setup is host
        time the device waits through): (a, b, start, upto, keep, keep_slice) per step, for video tokens [a, b)
        from the positions fed, [start, upto) (with a cache, those after the previous step's), and which of them
        give the logits: `keep` (CPU, relative to start), or `keep_slice` when they are contiguous (else None)."""
        key = (num_context_tokens, use_cache)
        if key not in self._plans:
            plan, fed = [], 0
            for a, b in self.decode_schedule(num_context_tokens):
                positions = self.step_positions(a, b)
                start, upto = (fed if use_cache else 0), int(positions.max()) + 1
                keep = positions - start
                contiguous = torch.equal(keep, torch.arange(keep[0], keep[-1] + 1))
                plan.append((a, b, start, upto, keep, slice(int(keep[0]), int(keep[-1]) + 1) if contiguous else None))
                fed = upto
            self._plans[key] = tuple(plan)
        return self._plans[key]
