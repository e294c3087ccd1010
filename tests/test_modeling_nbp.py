import math
import warnings

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModel, GenerationConfig
from transformers.masking_utils import create_causal_mask

from remote_code import run_without_package
from modeling_nbp import NBPConfig, NBPForVideoGeneration, generation
from modeling_nbp import modeling_nbp as nbp_module
from modeling_nbp.modeling_nbp import flex_block_causal_mask
from modeling_nbp.training.common import enable_activation_checkpointing


def tiny_config(block=(1, 1, 4), latent=(3, 4, 4), mode="class", first_block="bov", **kw):
    kw = dict(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.0,
                   video_vocab_size=40), **kw)
    if mode == "class":
        kw.setdefault("num_classes", 3)
    return NBPConfig(latent_shape=list(latent), block_shape=list(block), condition_mode=mode, first_block=first_block,
                     **kw)


def make_model(seed=0, attn="sdpa", **kw):
    torch.manual_seed(seed)
    model = NBPForVideoGeneration(tiny_config(**kw)).eval()
    model.set_attn_implementation(attn)
    return model


def grid(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.video_vocab_size, (batch, *model.config.latent_shape), generator=g)


def test_initialisation_follows_the_official_code_but_for_the_position_table():
    # official gpt.py: Linear/Embedding weights N(0, 0.02), zero biases, unit LayerNorms, the unconditional prefix
    # N(0, 1) / sqrt(hidden) (its position table starts at zeros, ours N(0, 0.02) as transformers' embeddings)
    model = make_model(hidden_size=64, intermediate_size=256)
    m = model.model
    assert abs(m.embed_tokens.weight.std().item() - 0.02) < 0.002
    assert abs(m.uncond_embedding.std().item() - 64**-0.5) < 0.04
    fc = m.layers[0].mlp
    linear = next(x for x in fc.modules() if isinstance(x, torch.nn.Linear))
    assert abs(linear.weight.std().item() - 0.02) < 0.002 and torch.count_nonzero(linear.bias) == 0
    assert torch.equal(m.norm.weight, torch.ones(64)) and torch.count_nonzero(m.norm.bias) == 0


# ---- block-causal attention, checked through the model ------------------------------------------------------------
@pytest.mark.parametrize("first_block", ["bov", "hybrid"])
def test_later_blocks_never_change_earlier_logits(first_block):
    model = make_model(first_block=first_block)
    inputs, _ = model.prepare_training_inputs(grid(model), [0, 1])
    S, L = model.layout.block_size, inputs.shape[1]
    base = model(input_ids=inputs).logits
    ids = model.layout.block_ids
    # every block start, and every token of the hybrid start's token-by-token row (group -1)
    starts = [p for p in range(L - 1, model.layout.prefix_length - 1, -1) if ids[p] < 0 or ids[p] != ids[p - 1]]
    assert len(starts) == (L - model.layout.prefix_length) // S + (S - 1) * (first_block == "hybrid")
    for b_start in starts:
        changed = inputs.clone()
        changed[:, b_start:] = model.config.video_token_offset + (changed[:, b_start:] - model.config.video_token_offset + 7) % 40
        group = model.layout.block_ids[b_start]
        first = b_start if group < 0 else int((model.layout.block_ids == group).nonzero()[0])
        logits = model(input_ids=changed).logits
        torch.testing.assert_close(logits[:, :first], base[:, :first], rtol=0, atol=1e-5)
        assert not torch.allclose(logits[:, b_start:], base[:, b_start:])


@pytest.mark.parametrize("first_block", ["bov", "hybrid"])
def test_the_model_attends_exactly_where_the_layout_allows(first_block):
    model = make_model(first_block=first_block, attn="eager")
    inputs, _ = model.prepare_training_inputs(grid(model, batch=1), [2])
    seen = []
    model.model.layers[0].self_attn.register_forward_hook(lambda m, args, out: seen.append(out[1][0, 0] > 0))
    model(input_ids=inputs)
    L = inputs.shape[1]
    assert torch.equal(seen[-1], model.layout.allowed(0, L))
    # a chunk fed against a cache: rows [past, L) of the same mask
    past = model.layout.prefix_length + 1 + model.layout.block_size
    cache = model(input_ids=inputs[:, :past], use_cache=True).cache
    model(input_ids=inputs[:, past:], cache=cache)
    assert torch.equal(seen[-1], model.layout.allowed(0, L)[past:])


def test_tokens_inside_a_block_see_each_other():
    model = make_model(block=(1, 1, 4))
    inputs, _ = model.prepare_training_inputs(grid(model), [0, 1])
    P, S = model.layout.prefix_length, model.layout.block_size
    block_start = P + 2 * S  # the third block: positions P+2S .. P+3S-1
    last = block_start + S - 1
    changed = inputs.clone()
    changed[:, last] = model.config.video_token_offset + (inputs[:, last] - model.config.video_token_offset + 1) % 40
    base, logits = model(input_ids=inputs).logits, model(input_ids=changed).logits
    # the block's first position sees its last one (bidirectional inside the block) ...
    assert not torch.allclose(logits[:, block_start], base[:, block_start])
    # ... and nothing before the block does
    torch.testing.assert_close(logits[:, :block_start], base[:, :block_start], rtol=0, atol=1e-5)


def test_condition_prefix_reaches_every_position():
    model = make_model()
    g = grid(model, batch=1)
    a, _ = model.prepare_training_inputs(g, [0])
    b, _ = model.prepare_training_inputs(g, [2])
    la, lb = model(input_ids=a).logits, model(input_ids=b).logits
    assert ((la - lb).abs().amax(dim=-1) > 1e-6).all()  # every position, the first one included


def test_prefix_tokens_are_bidirectional():
    model = make_model(num_classes=2, num_condition_tokens=2, class_condition_ids=[[3, 4], [5, 6]])
    inputs, _ = model.prepare_training_inputs(grid(model, batch=1), [0])
    changed = inputs.clone()
    changed[:, 1] = 5
    assert not torch.allclose(model(input_ids=changed).logits[:, 0], model(input_ids=inputs).logits[:, 0])


# ---- cached decoding = full recompute -------------------------------------------------------------------------------
CACHES = ["dynamic", "static"]  # transformers' DynamicCache, and the static path (the default on CPU and CUDA)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("block,first_block", [((1, 1, 1), "bov"), ((1, 1, 4), "bov"), ((1, 4, 4), "bov"),
                                                ((1, 1, 4), "hybrid"), ((1, 4, 4), "hybrid"), ((2, 1, 2), "bov")])
def test_cached_generation_equals_full_recompute(block, first_block, cache):
    latent = (4, 4, 4) if block[0] == 2 else (3, 4, 4)
    model = make_model(block=block, latent=latent, first_block=first_block)
    kw = dict(class_labels=[0, 2], top_k=20, top_p=0.9, temperature=1.0)
    cached = model.generate_video_tokens(generator=torch.Generator().manual_seed(3), cache_implementation=cache, **kw)
    full = model.generate_video_tokens(generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(cached, full)
    assert cached.shape == (2, *latent)


@pytest.mark.parametrize("cache", CACHES)
def test_cached_frame_prediction_equals_full_recompute(cache):
    model = make_model(mode="frames", first_block="none", num_context_frames=1)
    context = grid(model)[:, :1]
    kw = dict(context_ids=context, top_k=10)
    cached = model.generate_video_tokens(generator=torch.Generator().manual_seed(0), cache_implementation=cache, **kw)
    full = model.generate_video_tokens(generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :1], context)  # context kept as given
    assert len(model.layout.decode_schedule(16)) == (48 - 16) // 4


@pytest.mark.parametrize("cache", CACHES)
def test_cached_guidance_equals_full_recompute(cache):
    model = make_model(first_block="hybrid")
    kw = dict(class_labels=[1, 2], guidance_scale=3.0)
    cached = model.generate_video_tokens(generator=torch.Generator().manual_seed(5), cache_implementation=cache, **kw)
    full = model.generate_video_tokens(generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("block,first_block,frames", [((1, 1, 4), "hybrid", 1), ((2, 1, 2), "bov", 2)])
def test_cached_class_model_continuing_frames_equals_full_recompute(block, first_block, frames, cache):
    # the demo's frame prediction and every window after the first of a long video: a class model given frames,
    # with guidance; blocks that span two latent frames too
    latent = (4, 4, 4) if block[0] == 2 else (3, 4, 4)
    model = make_model(block=block, latent=latent, first_block=first_block)
    context = grid(model, batch=2)[:, :frames]
    kw = dict(class_labels=[1, 2], context_ids=context, guidance_scale=3.0, top_k=20)
    cached = model.generate_video_tokens(generator=torch.Generator().manual_seed(4), cache_implementation=cache, **kw)
    full = model.generate_video_tokens(generator=torch.Generator().manual_seed(4), use_cache=False, **kw)
    assert torch.equal(cached, full) and torch.equal(cached[:, :frames], context)


def test_batch_equals_single_runs_with_generator_list():
    model = make_model()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batch = model.generate_video_tokens(class_labels=[0, 1], generator=gens, top_k=10)
    singles = [model.generate_video_tokens(class_labels=[c], generator=torch.Generator().manual_seed(s), top_k=10)
               for c, s in ((0, 1), (1, 2))]
    assert torch.equal(batch, torch.cat(singles))


def test_greedy_is_deterministic_and_seeds_differ():
    model = make_model()
    greedy = [model.generate_video_tokens(class_labels=[0], temperature=0) for _ in range(2)]
    assert torch.equal(*greedy)
    a = model.generate_video_tokens(class_labels=[0], generator=torch.Generator().manual_seed(0))
    b = model.generate_video_tokens(class_labels=[0], generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_top_k_larger_than_vocab_and_top_p_one_are_plain_sampling():
    model = make_model()
    a = model.generate_video_tokens(class_labels=[0], generator=torch.Generator().manual_seed(4), top_k=10**6, top_p=1.0)
    b = model.generate_video_tokens(class_labels=[0], generator=torch.Generator().manual_seed(4), top_k=0, top_p=1.0)
    assert torch.equal(a, b)


def test_sampling_defaults_come_from_the_generation_config_then_the_paper(tmp_path):
    model = make_model()

    def run(**kw):
        return model.generate_video_tokens(class_labels=[0, 1], generator=torch.Generator().manual_seed(3), **kw)

    paper = run(top_k=16000, top_p=0.9, temperature=1.0, guidance_scale=1.0)
    assert torch.equal(run(), paper)
    chosen = dict(top_k=5, top_p=0.8, temperature=0.7, guidance_scale=2.0)
    model.generation_config.update(do_sample=True, **chosen)
    assert torch.equal(run(), run(**chosen)) and not torch.equal(run(), paper)
    assert torch.equal(run(top_k=16000, top_p=0.9, temperature=1.0, guidance_scale=1.0), paper)  # the call wins
    model.save_pretrained(tmp_path)  # saved and loaded with the model (generation_config.json)
    loaded = NBPForVideoGeneration.from_pretrained(tmp_path)
    assert {k: getattr(loaded.generation_config, k) for k in chosen} == chosen
    model.generation_config.do_sample = False  # transformers' meaning: greedy
    assert torch.equal(run(), run(temperature=0, top_k=5, top_p=0.8, guidance_scale=2.0))
    # unless the call asks for sampling: its top-k samples at the saved temperature
    assert torch.equal(run(top_k=3), run(top_k=3, temperature=0.7)) and not torch.equal(run(top_k=3), run())
    # generation_config=None means "not given" (the saved file is read), as in transformers
    assert NBPForVideoGeneration.from_pretrained(tmp_path, generation_config=None).generation_config.top_k == 5
    # a bad saved value is named as the generation_config's, not as an argument of the call
    loaded.generation_config.top_p = 0.0
    with pytest.raises(ValueError, match="top_p was not passed to this call: it came from the model's generation_config"):
        loaded.generate_video_tokens(class_labels=[0])


def test_generate_is_transformers_name_for_generation():
    model = make_model()
    kw = dict(class_labels=[0, 1], top_k=5)
    tokens = model.generate(generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(tokens, model.generate_video_tokens(generator=torch.Generator().manual_seed(2), **kw))
    # a generation_config given to the call stands in for the model's own; the call's own values still win
    greedy = model.generate_video_tokens(class_labels=[0, 1], temperature=0)
    assert torch.equal(model.generate(class_labels=[0, 1], generation_config=GenerationConfig(do_sample=False)), greedy)
    config = GenerationConfig(do_sample=True, top_k=5, temperature=0.5)
    assert torch.equal(model.generate(generator=torch.Generator().manual_seed(2), generation_config=config,
                                      temperature=1.0, **kw), tokens)
    assert model.generation_config.top_k != 5  # the model's own is left as it was
    with pytest.raises(ValueError, match="input_ids: an NBP video is generated from class_labels"):
        model.generate(torch.zeros(1, 4, dtype=torch.long))



def test_generation_config_fields_that_generation_would_ignore_are_refused():
    model = make_model()
    for config in (GenerationConfig(num_beams=4), GenerationConfig(do_sample=True, num_return_sequences=2),
                   GenerationConfig(max_new_tokens=8), GenerationConfig(do_sample=True, repetition_penalty=1.3)):
        with pytest.raises(ValueError, match="generation_config .* sets .* which NBP generation does not support"):
            model.generate(class_labels=[0], generation_config=config)
    # values that leave a field unset, token ids and output flags left off are accepted
    neutral = GenerationConfig(do_sample=True, top_k=5, num_beams=1, num_return_sequences=1, use_cache=True,
                               eos_token_id=3, output_scores=False)
    seeded = lambda: dict(class_labels=[0], generator=torch.Generator().manual_seed(1))  # noqa: E731
    assert torch.equal(model.generate(generation_config=neutral, **seeded()), model.generate(top_k=5, **seeded()))
    # fields given as keyword arguments update the config, as in transformers
    assert torch.equal(model.generate(do_sample=False, **seeded()),
                       model.generate(generation_config=GenerationConfig(do_sample=False), **seeded()))
    with pytest.raises(ValueError, match="sets num_beams=2, which NBP generation does not support"):
        model.generate(num_beams=2, **seeded())
    with pytest.raises(TypeError, match="unexpected keyword argument 'beams'"):
        model.generate(beams=2, **seeded())
    model.generation_config.num_return_sequences = 2  # the model's own as well
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        model.generate_video_tokens(class_labels=[0])


def test_sampler_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.30, 0.12, 0.25, 0.20, 0.08])  # no ties: top-k is well defined
    logits = probs.log().expand(200_000, -1)
    for top_k, top_p, kept in ((None, 1.0, [0, 1, 2, 3, 4, 5]), (4, 1.0, [1, 2, 3, 4]), (None, 0.7, [1, 3, 4]),
                               (4, 0.7, [1, 3, 4]), (2, 0.6, [1, 3]), (2, 0.5, [1])):
        tokens = generation.sample_tokens(logits, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(0))
        expected = torch.zeros(6)
        expected[kept] = probs[kept] / probs[kept].sum()
        frequencies = torch.bincount(tokens, minlength=6) / len(tokens)
        sigma = (expected * (1 - expected) / len(tokens)).sqrt()
        assert ((frequencies - expected).abs() <= 5 * sigma + 1e-9).all(), (top_k, top_p, frequencies)
    # temperature sharpens the same distribution
    cold = generation.sample_tokens(logits, temperature=0.5, generator=torch.Generator().manual_seed(0))
    expected = probs**2 / (probs**2).sum()
    assert ((torch.bincount(cold, minlength=6) / len(cold) - expected).abs() < 0.005).all()
    # noise at the top of [0, 1) picks the last kept token, never a dropped one
    top = generation.sample_tokens(logits[:4], top_k=4, top_p=0.7, noise=torch.full((4,), 1 - 2**-24))
    assert (top == 4).all()  # the last kept token in rank order (0.30, 0.25, 0.20)


def test_top_p_keeps_tokens_until_the_mass_above_them_exceeds_it():
    # the official rule (a token stays while the tokens ranked above it hold at most top_p), pinned at an exact tie
    logits = torch.tensor([4.0, 2.0, 1.0, 1.0]).log().expand(4, -1)  # probabilities exactly 1/2, 1/4, 1/8, 1/8
    assert (generation.sample_tokens(logits, top_p=0.5, noise=torch.full((4,), 1 - 2**-24)) == 1).all()
    assert (generation.sample_tokens(logits, top_p=0.49, noise=torch.full((4,), 1 - 2**-24)) == 0).all()


def test_guidance_pushes_away_from_the_unconditional_logits():
    cond, uncond = torch.tensor([[[0.0, 1.0, 0.5]]]), torch.tensor([[[0.0, 2.0, 0.0]]])
    # uncond + 3 (cond - uncond) = [0, -1, 1.5]: token 2, although both halves prefer token 1
    assert generation.sample_guided(torch.cat([cond, uncond]), None, temperature=0, guidance_scale=3.0).item() == 2
    # guidance 0 is the unconditional model: the class no longer matters
    model = make_model(first_block="hybrid")
    unconditional = [model.generate_video_tokens(class_labels=[c], guidance_scale=0.0, temperature=0) for c in range(3)]
    assert all(torch.equal(unconditional[0], u) for u in unconditional[1:])
    conditional = [model.generate_video_tokens(class_labels=[c], temperature=0) for c in range(3)]
    assert any(not torch.equal(u, c) for u, c in zip(unconditional, conditional))


def test_top_k_one_is_greedy():
    model = make_model()
    a = model.generate_video_tokens(class_labels=[1], generator=torch.Generator().manual_seed(4), top_k=1)
    assert torch.equal(a, model.generate_video_tokens(class_labels=[1], temperature=0))


# ---- equivalences and numerics ------------------------------------------------------------------------------------
def test_block_one_is_a_plain_causal_lm():
    """NBP with 1x1x1 blocks and a start block of one BOV is next-token prediction: logits equal a
    straightforward causal GPT written here from the published description."""
    model = make_model(block=(1, 1, 1))
    inputs, labels = model.prepare_training_inputs(grid(model), [0, 1])
    m, cfg = model.model, model.config
    x = m.embed_tokens(inputs) + m.embed_positions.weight[: inputs.shape[1]]
    L, H = inputs.shape[1], cfg.num_attention_heads
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for layer in m.layers:
        a = layer.self_attn
        h = F.layer_norm(x, (cfg.hidden_size,), layer.input_layernorm.weight, layer.input_layernorm.bias, 1e-5)
        q, k, v = (lin(h).view(2, L, H, -1).transpose(1, 2) for lin in (a.q_proj, a.k_proj, a.v_proj))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + a.o_proj((att @ v).transpose(1, 2).reshape(2, L, -1))
        h = F.layer_norm(x, (cfg.hidden_size,), layer.post_attention_layernorm.weight,
                         layer.post_attention_layernorm.bias, 1e-5)
        x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(h)))
    ref = model.lm_head(F.layer_norm(x, (cfg.hidden_size,), m.norm.weight, m.norm.bias, 1e-5))
    torch.testing.assert_close(model(input_ids=inputs).logits, ref, rtol=1e-5, atol=1e-5)
    # and the targets are the next token
    assert torch.equal(labels[:, 1:-1], inputs[:, 2:])


def test_sdpa_and_eager_agree():
    sdpa, eager = make_model(attn="sdpa", first_block="hybrid"), make_model(attn="eager", first_block="hybrid")
    inputs, labels = sdpa.prepare_training_inputs(grid(sdpa), [0, 1])
    a, b = sdpa(input_ids=inputs, labels=labels), eager(input_ids=inputs, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    gen = dict(class_labels=[0, 1], top_k=10)
    assert torch.equal(sdpa.generate_video_tokens(generator=torch.Generator().manual_seed(0), **gen),
                       eager.generate_video_tokens(generator=torch.Generator().manual_seed(0), **gen))


def test_loss_decreases_on_tiny_overfit():
    torch.manual_seed(0)
    model = NBPForVideoGeneration(tiny_config(first_block="hybrid"))
    model.train()
    video, labels = grid(model, batch=4), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(video_ids=video, class_labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(40) * 0.8
    assert losses[-1] < 0.3 * losses[0]


def test_class_dropout_uses_unconditional_prefix():
    model = make_model(class_dropout_prob=1.0)
    model.train()
    g = grid(model, batch=1)
    a = model(video_ids=g, class_labels=[0]).logits
    b = model(video_ids=g, class_labels=[2]).logits
    torch.testing.assert_close(a, b)  # every row dropped: the class no longer matters
    model.eval()
    assert not torch.allclose(model(video_ids=g, class_labels=[0]).logits, model(video_ids=g, class_labels=[2]).logits)
    # at the rate asked, each row on its own: a row's logits are its class's or the unconditional prefix's
    model = make_model(class_dropout_prob=0.5).train()
    g = grid(model, batch=64)
    labels = torch.zeros(64, dtype=torch.long)
    kept, dropped = (model.eval()(video_ids=g, class_labels=labels, drop_condition=torch.full((64,), d)).logits
                     for d in (False, True))
    torch.manual_seed(0)
    mixed = model.train()(video_ids=g, class_labels=labels).logits
    is_dropped = [torch.allclose(m, d) and not torch.allclose(m, k) for m, d, k in zip(mixed, dropped, kept)]
    assert all(torch.allclose(m, d) or torch.allclose(m, k) for m, d, k in zip(mixed, dropped, kept))
    assert 20 <= sum(is_dropped) <= 44  # about half of 64 (binomial: 32 +- 4)


# ---- save / load ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = make_model(first_block="hybrid")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    inputs, _ = model.prepare_training_inputs(grid(model), [0, 1])
    for loaded in (NBPForVideoGeneration.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is NBPForVideoGeneration
        torch.testing.assert_close(loaded.eval()(input_ids=inputs).logits, model(input_ids=inputs).logits,
                                   rtol=0, atol=0)
    assert AutoConfig.from_pretrained(tmp_path).block_shape == [1, 1, 4]



def test_resize_token_embeddings_keeps_the_vocabulary_layout():
    model = make_model()  # ids: BOV 0, conditions 1..3, video 4..43
    with pytest.raises(ValueError, match=r"new_num_tokens \(30\) must be at least 44"):
        model.resize_token_embeddings(30)
    assert model.lm_head.weight.shape[0] == model.config.vocab_size == 44
    model.resize_token_embeddings(50)  # growing adds ids past the video range
    assert model.config.vocab_size == 50 and model.lm_head.weight.shape[0] == 50
    assert model.generate_video_tokens(class_labels=[0]).shape == (1, 3, 4, 4)
    model.resize_token_embeddings(41, pad_to_multiple_of=16)  # rounded up to 48: every id kept
    assert model.config.vocab_size == 48 and model.lm_head.weight.shape[0] == 48


def test_remote_code_loads_without_the_package(tmp_path):
    model = make_model(first_block="hybrid")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_nbp.py").exists() and (tmp_path / "configuration_nbp.py").exists()
    # the Triton kernels travel too, and the import check of a Hub load does not ask for triton (they import it
    # when they run)
    from transformers.dynamic_module_utils import get_imports

    carried = {p.name for p in tmp_path.glob("*.py")}
    assert {"decode_kernels.py", "loss_kernels.py", "generation.py"} <= carried
    assert not [name for name in carried if "triton" in get_imports(tmp_path / name)]
    inputs, _ = model.prepare_training_inputs(grid(model), [0, 1])
    ids = grid(model)
    torch.save({"inputs": inputs, "logits": model(input_ids=inputs).logits, "ids": ids,
                "loss": model(video_ids=ids, class_labels=torch.tensor([0, 1])).loss}, tmp_path / "expected.pt")
    stdout = run_without_package(f"""
        import os
        os.environ["TRITON_INTERPRET"] = "1"  # the carried Triton loss kernel, on CPU
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        torch.testing.assert_close(model(input_ids=expected["inputs"]).logits, expected["logits"])
        model.loss_implementation = "triton"
        loss = model(video_ids=expected["ids"], class_labels=torch.tensor([0, 1])).loss
        torch.testing.assert_close(loss, expected["loss"])
        print("remote ok")
    """, tmp_path / "modules")
    assert "remote ok" in stdout


@pytest.mark.parametrize("mode, first_block", [("class", "hybrid"), ("frames", "none")])
def test_the_training_forward_compiles_as_one_graph(mode, first_block):
    """torch.compile(model) for training traces the whole forward (input checks, labels, mask, loss) as one graph:
    the checks become device-side asserts there, with the same messages."""
    model = make_model(mode=mode, first_block=first_block).train()
    ids, cond = grid(model), dict(class_labels=torch.tensor([0, 2])) if mode == "class" else {}
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # any graph break is an error
    assert torch.allclose(compiled(video_ids=ids, **cond).loss, model(video_ids=ids, **cond).loss)
    with pytest.raises(RuntimeError, match=r"video token ids must lie in \[0, 40\)"):
        compiled(video_ids=ids.clamp(max=39) + 1, **cond)
    if mode == "class":
        with pytest.raises(RuntimeError, match=r"class_labels must lie in \[0, 3\)"):
            compiled(video_ids=ids, class_labels=torch.tensor([0, 3]))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    plain, checkpointed = make_model(hidden_dropout=0.1).train(), make_model(hidden_dropout=0.1).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current transformers name, not the deprecated one
        enable_activation_checkpointing(checkpointed)
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # the same dropout masks; checkpointing replays them in the backward
        losses.append(model(video_ids=grid(model), class_labels=[0, 2]).loss)
        losses[-1].backward()
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None and b.grad is None) or torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_flex_attention_is_refused_on_cpu():
    model = make_model(attn="flex_attention")
    inputs, _ = model.prepare_training_inputs(grid(model), [0, 1])
    with pytest.raises(ValueError, match=r"flex_attention' runs on \('cuda',\) devices, got cpu.*use 'sdpa'"):
        model(input_ids=inputs)


@pytest.mark.parametrize("first_block", ["bov", "hybrid"])
def test_flex_attention_gives_the_sdpa_logits_eager_and_compiled(first_block, monkeypatch):
    """Flex attention (the training default on CUDA) with the layout's block mask gives the SDPA logits, also under
    torch.compile, where the mask is built inside the one graph (`flex_block_causal_mask`, checked against
    transformers' `create_causal_mask`). On CPU, for a length the CPU kernel gets right (and checked here against
    SDPA); no gradients: flex attention has no backward on CPU."""
    monkeypatch.setattr(nbp_module, "FLEX_ATTENTION_DEVICES", ("cuda", "cpu"))
    kw = dict(first_block=first_block, latent=(3, 8, 8), block=(1, 2, 4))  # about 200 positions: two 128-blocks
    flex, sdpa = make_model(attn="flex_attention", **kw), make_model(**kw)
    inputs, _ = flex.prepare_training_inputs(grid(flex), [0, 1])
    block_ids = flex.layout.block_ids[: inputs.shape[1]].expand(2, -1)
    reference = create_causal_mask(config=flex.config, inputs_embeds=torch.zeros(2, inputs.shape[1], 1),
                                   attention_mask=None, cache=None, block_sequence_ids=block_ids,
                                   position_ids=torch.arange(inputs.shape[1])[None])
    built = flex_block_causal_mask(block_ids)
    assert torch.equal(built.to_dense(), reference.to_dense()) and built.BLOCK_SIZE == reference.BLOCK_SIZE
    with torch.no_grad():
        expected = sdpa(input_ids=inputs).logits
        assert torch.allclose(flex(input_ids=inputs).logits, expected, atol=1e-5)
        compiled = torch.compile(flex, fullgraph=True, backend="eager")  # a graph break is an error
        assert torch.allclose(compiled(input_ids=inputs).logits, expected, atol=1e-5)


# ---- bad inputs ---------------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"training takes whole video token grids \(batch, 3, 4, 4\)"):
        model(video_ids=torch.zeros(1, 3, 4, 5, dtype=torch.long), class_labels=[0])
    with pytest.raises(ValueError, match=r"training takes whole video token grids"):  # a context-sized grid
        model(video_ids=torch.zeros(1, 2, 4, 4, dtype=torch.long), class_labels=[0])
    with pytest.raises(ValueError, match=r"got 3 condition prefixes \(class_labels\) for 2 video grids"):
        model(video_ids=torch.zeros(2, 3, 4, 4, dtype=torch.long), class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, positions\)"):
        model(input_ids=torch.zeros(5, dtype=torch.long))
    inputs, labels = model.prepare_training_inputs(grid(model), [0, 1])
    with pytest.raises(ValueError, match=r"labels must have the logits' shape"):
        model(input_ids=inputs, labels=labels[:, 1:])
    with pytest.raises(ValueError, match=r"labels must be video ids, in \[4, 44\), or -100 .*\(not input_ids shifted"):
        model(input_ids=inputs, labels=inputs)  # the causal LM idiom: would train each position to copy itself
    labels[0, -1] = -1  # only -100 means "no target": another negative label is refused, never read as id 0
    with pytest.raises(ValueError, match=r"labels must be video ids, in \[4, 44\), or -100 \(no target\).*; got -1"):
        model(input_ids=inputs, labels=labels)
    low, high = model.config.condition_token_offset, model.config.condition_token_offset + 3
    with pytest.raises(ValueError, match=rf"condition_ids must lie in this model's condition range \[{low}, {high}\)"):
        model.generate_video_tokens(condition_ids=[[low - 1]])  # a raw text id, offset forgotten
    with pytest.raises(ValueError, match=r"video token ids must lie in \[0, 40\)"):
        model(video_ids=torch.full((1, 3, 4, 4), 40), class_labels=[0])
    with pytest.raises(ValueError, match=r"input_ids must lie in"):
        model(input_ids=torch.full((1, 5), 10**6))
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\)"):
        model.generate_video_tokens(class_labels=[3])
    with pytest.raises(ValueError, match=r"class_labels must be ints in \[0, 3\); got torch.float32 values"):
        model.generate_video_tokens(class_labels=[1.7])  # never truncated to class 1
    with pytest.raises(ValueError, match="class_labels must be ints here"):
        model.generate_video_tokens(class_labels=["circle"])
    with pytest.raises(ValueError, match="pass class_labels"):
        model.generate_video_tokens()
    with pytest.raises(ValueError, match="top_p"):
        model.generate_video_tokens(class_labels=[0], top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate_video_tokens(class_labels=[0], temperature=-1)
    frames = make_model(mode="frames", first_block="none", num_context_frames=1)
    with pytest.raises(ValueError, match=r"unconditional embedding; this model has none \(condition_mode='frames'\)$"):
        frames.generate_video_tokens(context_ids=torch.zeros(1, 1, 4, 4, dtype=torch.long), guidance_scale=2.0)
    frames.generation_config = GenerationConfig(guidance_scale=2.0)
    with pytest.raises(ValueError, match="it came from the model's generation_config"):
        frames.generate_video_tokens(context_ids=torch.zeros(1, 1, 4, 4, dtype=torch.long))
    frames.generation_config = GenerationConfig()
    with pytest.raises(ValueError, match="at least one block of context"):
        frames.generate_video_tokens(batch_size=1)
    with pytest.raises(ValueError, match="context_ids must have shape"):
        frames.generate_video_tokens(context_ids=torch.zeros(1, 1, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="not class-conditional"):
        frames.generate_video_tokens(class_labels=[0], context_ids=torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        model.generate_video_tokens(class_labels=[0], condition_ids=[model.config.class_condition_ids[1]])
    nan, inf = float("nan"), float("inf")
    for name, value in (("guidance_scale", "3"), ("top_p", 1.5), ("top_k", 2.5), ("temperature", "1"),
                        ("temperature", nan), ("temperature", inf), ("guidance_scale", nan), ("guidance_scale", inf),
                        ("top_p", nan)):
        with pytest.raises(ValueError, match=name):
            model.generate_video_tokens(class_labels=[0], **{name: value})


def test_sampling_arguments_of_other_types():
    model = make_model()
    reference = model.generate_video_tokens(class_labels=[1], top_k=5, generator=torch.Generator().manual_seed(0))
    import numpy as np
    for labels in (1, np.int64(1), torch.tensor(1), np.array([1])):  # one label in any form
        tokens = model.generate_video_tokens(class_labels=labels, top_k=np.int64(5),
                                             generator=torch.Generator().manual_seed(0))
        assert torch.equal(tokens, reference)


def test_narrow_integer_ids_train_and_generate_as_int64():
    model = make_model(video_vocab_size=300)
    ids = grid(model)
    expected = model(video_ids=ids, class_labels=[0, 1]).loss
    for dtype in (torch.int32, torch.int16, torch.uint8):  # uint8 holds every id below 256
        small = ids.clamp(max=255).to(dtype)
        assert torch.equal(model(video_ids=small, class_labels=[0, 1]).loss,
                           model(video_ids=small.long(), class_labels=[0, 1]).loss)
    assert torch.equal(model(video_ids=ids.int(), class_labels=[0, 1]).loss, expected)
    # the range check compares in int64: 300 as uint8 would wrap to 44
    context = torch.full((1, 1, 4, 4), 50, dtype=torch.uint8)
    assert model.generate_video_tokens(class_labels=[0], context_ids=context)[:, :1].eq(50).all()
    with pytest.raises(ValueError, match=r"video token ids must lie in \[0, 300\)"):
        model(video_ids=ids.clamp(max=255).to(torch.int16) + 290, class_labels=[0, 1])



def test_ids_of_any_integer_type_train_and_generate():
    # 64000 codes fit in uint16: token arrays are often stored so
    model = make_model()
    ids = grid(model)
    expected = model(video_ids=ids, class_labels=[0, 1]).loss
    for dtype in (torch.uint16, torch.uint32, torch.int8):
        assert torch.equal(model(video_ids=ids.to(dtype), class_labels=[0, 1]).loss, expected)
        context = ids[:1, :1].to(dtype)
        assert torch.equal(model.generate_video_tokens(class_labels=[0], context_ids=context)[:, :1], ids[:1, :1])
    with pytest.raises(TypeError, match="must be an integer tensor, got torch.bool"):
        model(video_ids=ids > 0, class_labels=[0, 1])

def test_batch_prefix_and_condition_dropout_arguments_are_checked():
    model = make_model()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            model.generate_video_tokens(class_labels=[0], batch_size=bad)
    with pytest.raises(ValueError, match="nothing to generate"):
        model.generate_video_tokens(class_labels=[])
    offset = model.config.condition_token_offset
    for bad in ([[offset + 0.9]], [[True]]):  # never truncated to an id
        with pytest.raises(ValueError, match="condition_ids must be ints"):
            model.generate_video_tokens(condition_ids=bad)
    inputs = torch.zeros(2, 3, dtype=torch.long)
    for bad in (torch.tensor([1, 0]), torch.tensor([True]), torch.tensor([[True, False]])):
        with pytest.raises(ValueError, match=r"drop_condition must be a bool tensor of shape \(batch,\) = \(2,\)"):
            model(input_ids=inputs, drop_condition=bad)


def test_config_refuses_class_counts_and_sizes_that_disagree():
    config = tiny_config()
    with pytest.raises(ValueError, match=r"num_classes \(5\) disagrees with class_condition_ids \(3 classes\)"):
        NBPConfig(**dict(config.to_dict(), num_classes=5))
    with pytest.raises(ValueError, match=r"num_condition_tokens \(2\) disagrees"):
        NBPConfig(**dict(config.to_dict(), num_condition_tokens=2))
    with pytest.raises(ValueError, match=r"num_classes / class_condition_ids are for condition_mode='class'; got "
                                         r"condition_mode='frames' with num_classes=3"):  # was dropped silently
        NBPConfig.from_preset("k600-tiny", num_classes=3)
    config.num_classes = 5  # as from_pretrained(path, num_classes=5) sets it: refused when a model is built
    with pytest.raises(ValueError, match="must equal the number of class_condition_ids"):
        NBPForVideoGeneration(config)
    for field, bad in (("video_vocab_size", 0), ("video_vocab_size", 40.0), ("max_position_embeddings", 100.0),
                       ("layer_norm_eps", -1.0), ("num_context_frames", True)):
        with pytest.raises(ValueError, match=field):
            tiny_config(**{field: bad})
    # a TypeError from deep inside, or a confusing message, before: each names the field now
    for field, bad, allowed in (("hidden_dropout", None, "a number"), ("class_dropout_prob", "0.1", "a number"),
                                ("layer_norm_eps", None, "a number"), ("num_classes", "3", r"an int >= 0 \(or None"),
                                ("num_classes", -2, "an int >= 0"), ("vocab_size", 100.5, "an int"),
                                ("bov_token_id", 1.5, "an int")):
        with pytest.raises(ValueError, match=rf"{field} must be {allowed}.*, got {bad!r}"):
            tiny_config(**{field: bad})


def test_condition_mode_overridden_at_loading_is_refused(tmp_path):
    # from_pretrained(path, condition_mode=...) sets the field on the saved class model's config, whose condition
    # prefix and class ids stay: refused when the model is built, never a shape error at the first forward
    NBPForVideoGeneration(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"condition_mode='none' takes no condition prefix, but num_condition_tokens "
                                         r"is 1 and class_condition_ids is set"):
        NBPForVideoGeneration.from_pretrained(tmp_path, condition_mode="none")


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_tokens_written_back_outside_the_vocabulary_are_refused(cache_implementation):
    model = make_model()
    for value in (model.config.video_vocab_size, -1):  # -1 marks tokens not generated yet
        steps = model.iter_generation(class_labels=[0], cache_implementation=cache_implementation)
        with pytest.raises(ValueError, match=r"wrote video_tokens outside \[0, 40\)"):
            for step in steps:
                step.video_tokens[:, step.start : step.end] = value
    steps = model.iter_generation(class_labels=[0], cache_implementation=cache_implementation)
    for step in steps:  # ids inside the vocabulary are fed as written
        step.video_tokens[:, step.start : step.end] = 7
    assert step.video_tokens.eq(7).all()


def test_a_tiny_temperature_samples_the_greedy_tokens():
    model = make_model()
    greedy = model.generate_video_tokens(class_labels=[0, 1], temperature=0)
    for temperature in (1e-30, 1e-40):  # 1 / t overflows float32
        tokens = model.generate_video_tokens(class_labels=[0, 1], temperature=temperature,
                                             generator=torch.Generator().manual_seed(0))
        assert torch.equal(tokens, greedy)


def test_generation_in_training_mode_samples_as_in_eval_mode():
    model = make_model(hidden_dropout=0.3, class_dropout_prob=0.5)
    expected = model.generate_video_tokens(class_labels=[0, 2], top_k=5, generator=torch.Generator().manual_seed(0))
    model.train()
    for cache_implementation in ("dynamic", "static"):
        tokens = model.generate_video_tokens(class_labels=[0, 2], top_k=5, generator=torch.Generator().manual_seed(0),
                                             cache_implementation=cache_implementation)
        assert torch.equal(tokens, expected)
        assert model.training  # switched back
    model.eval()
    model.model.layers[0].train()  # a submodule alone in training mode: its dropout would move the tokens
    tokens = model.generate_video_tokens(class_labels=[0, 2], top_k=5, generator=torch.Generator().manual_seed(0),
                                         cache_implementation="dynamic")  # (the static step calls no dropout)
    assert torch.equal(tokens, expected)
    assert [name for name, m in model.named_modules() if m.training] == ["model.layers.0"] + [
        f"model.layers.0.{name}" for name, _ in model.model.layers[0].named_modules() if name]  # as it was
    model.train()
    model.model.embed_positions.eval()  # a frozen part stays in eval (was put in training mode)
    model.generate_video_tokens(class_labels=[0], temperature=0.0)
    assert model.training and not model.model.embed_positions.training


# ---- the fast path: a static (preallocated) cache gives the reference tokens -------------------------------------
@pytest.mark.parametrize("block,first_block,guidance", [((1, 1, 4), "hybrid", 1.0), ((1, 4, 4), "bov", 2.5),
                                                         ((1, 1, 1), "bov", 1.0), ((1, 1, 4), "hybrid", 3.0)])
def test_static_cache_equals_reference(block, first_block, guidance):
    model = make_model(block=block, first_block=first_block)
    kw = dict(class_labels=[0, 2], top_k=20, top_p=0.9, guidance_scale=guidance)
    fast = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), cache_implementation="static", **kw)
    reference = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(fast, reference)


@pytest.mark.parametrize("first_block,guidance", [("hybrid", 1.0), ("bov", 2.5)])
def test_whole_vocabulary_sampling(first_block, guidance):
    """The official samplers' reading (converted checkpoints): every id may be sampled; it is fed back as it is and
    read as the nearest video id. Every decoding path agrees."""
    model = make_model(first_block=first_block, sample_whole_vocabulary=True)
    kw = dict(class_labels=[0, 2], top_k=30, top_p=0.95, guidance_scale=guidance)
    paths = (dict(use_cache=False), dict(cache_implementation="dynamic"), dict(cache_implementation="static"))
    runs = [model.generate_video_tokens(generator=torch.Generator().manual_seed(7), **kw, **path) for path in paths]
    assert all(torch.equal(run, runs[0]) for run in runs)
    # a head that always prefers id 1 (a condition id): every video token reads as 0, and id 1 is what is fed back
    off = model.config.video_token_offset
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.bias.copy_(torch.linspace(-1, 1, model.config.hidden_size))
        model.lm_head.weight[1] = 100 * model.model.norm.bias
    fed = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda module, args: fed.append(args[0].clone()))
    try:
        for path in paths:
            fed.clear()
            tokens = model.generate_video_tokens(class_labels=[0], temperature=0, **path)
            assert (tokens == 0).all()
            last = fed[-1][0]  # the last forward's input: ends with the tokens sampled so far
            assert (last[-3:] == 1).all() and not (last >= off).any()
    finally:
        hook.remove()


class ReplayGraph:
    """Stands in for a CUDA graph on CPU. Capturing records the step without changing the cache (a capture runs
    nothing); a replay re-runs the recorded step on its static inputs and writes its static output."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        with torch.inference_mode():  # a replay writes device memory, whatever autograd mode the caller is in
            self.out.copy_(self.fn())
        self.replays += 1


@pytest.fixture
def replay_graphs(monkeypatch):
    """CUDA graphs stood in by `ReplayGraph` (and reported available): the list of graphs captured."""
    graphs = []

    def capture(fn, pool):
        # a capture runs nothing: undo what the recorded step wrote into the caches
        layers = [t for d in decoders for t in d.cache.kv]
        saved = [t.clone() for t in layers]
        out = fn()
        for t, kept in zip(layers, saved):
            t.copy_(kept)
        graphs.append(ReplayGraph(fn, out))
        return graphs[-1], out

    decoders = []
    real_init = generation.StaticDecoder.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        decoders.append(self)

    monkeypatch.setattr(generation.StaticDecoder, "__init__", init)
    monkeypatch.setattr(generation, "capture_cuda_graph", capture)
    monkeypatch.setattr(generation, "cuda_graphs_supported", lambda device: True)
    monkeypatch.setattr(generation.torch.cuda, "graph_pool_handle", lambda: None)
    return graphs


def test_compiled_parts_never_compile_inside_a_graph_capture(replay_graphs, monkeypatch):
    """A call in another autograd mode than the first (here inference mode) needs new compilations of the dense
    parts: they must happen in an eager run, not inside a capture (on CUDA that would compile on a capturing
    stream)."""
    from torch._dynamo.testing import CompileCounter

    from modeling_nbp import modeling_nbp

    counter = CompileCounter()
    parts = tuple(torch.compile(f, fullgraph=True, dynamic=False, backend=counter) for f in modeling_nbp.DECODE_PARTS)
    monkeypatch.setattr(modeling_nbp, "compiled_decode_parts", lambda mode="default": parts)
    inside = []
    capture = generation.capture_cuda_graph

    def counting_capture(fn, pool):
        before = counter.frame_count
        graph, out = capture(fn, pool)
        inside.append(counter.frame_count - before)
        graph.replay = lambda: graph.out.copy_(graph.fn())  # a replay runs no Python on CUDA: no compiling there
        return graph, out

    monkeypatch.setattr(generation, "capture_cuda_graph", counting_capture)
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    kw = dict(class_labels=[0], top_k=20, cache_implementation="static", compile_decode=True)
    first = model.generate_video_tokens(generator=torch.Generator().manual_seed(1), **kw)
    with torch.inference_mode():
        second = model.generate_video_tokens(generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(first, second) and len(inside) > 0 and set(inside) == {0}


def test_compiled_decoding_takes_many_batch_sizes(monkeypatch):
    """Each batch size is one more compilation of the dense parts; past torch.compile's default limit (8) a fullgraph
    compile would fail."""
    from torch._dynamo.testing import CompileCounter

    from modeling_nbp import modeling_nbp

    counter = CompileCounter()
    parts = tuple(torch.compile(f, fullgraph=True, dynamic=False, backend=counter) for f in modeling_nbp.DECODE_PARTS)
    monkeypatch.setattr(modeling_nbp, "compiled_decode_parts", lambda mode="default": parts)
    model = make_model(block=(1, 1, 4), first_block="hybrid")  # two feed lengths: 2 compilations per batch size
    for batch in range(1, 7):
        model.generate_video_tokens(class_labels=[0] * batch, top_k=5, cache_implementation="static",
                                    compile_decode=True, generator=torch.Generator().manual_seed(0))
    assert counter.frame_count > 8


def test_compiled_decoding_runs_on_torch_2_6(monkeypatch):
    """torch 2.6, the oldest one setup.py allows, names dynamo's recompile limit `cache_size_limit` only (2.7 renamed
    it `recompile_limit`, keeping the old name as an alias)."""
    import contextlib

    import torch._dynamo

    from modeling_nbp import modeling_nbp

    class Torch26DynamoConfig:
        cache_size_limit = 8

        def patch(self, **changes):
            for name in changes:
                if not hasattr(self, name):
                    raise AttributeError(f"torch._dynamo.config.{name} does not exist")
            return contextlib.nullcontext()

    monkeypatch.setattr(torch._dynamo, "config", Torch26DynamoConfig())
    monkeypatch.setattr(modeling_nbp, "compiled_decode_parts", lambda mode="default": modeling_nbp.DECODE_PARTS)
    model = make_model(latent=(2, 2, 4))
    kw = dict(class_labels=[0], top_k=5, cache_implementation="static", generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate_video_tokens(compile_decode=True, **kw),
                       model.generate_video_tokens(**dict(kw, generator=torch.Generator().manual_seed(0))))


def test_a_new_static_decoder_is_allocated_after_the_old_one_is_freed(monkeypatch):
    import weakref

    model = make_model()
    model.generate_video_tokens(class_labels=[0, 1], top_k=5, cache_implementation="static")
    old = weakref.ref(model._static_decoder)
    alive = []
    real_init = generation.BlockKVCache.__init__
    monkeypatch.setattr(generation.BlockKVCache, "__init__",
                        lambda self, *a, **k: (alive.append(old() is not None), real_init(self, *a, **k))[1])
    model.generate_video_tokens(class_labels=[0], top_k=5, cache_implementation="static")  # another batch size
    assert alive == [False]


# operators whose result the host must read (a synchronisation): a CUDA graph cannot hold them
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2", "unique_dim",
              "unique_consecutive"}


class HostReads(TorchDispatchMode):
    """Lists the operators of HOST_READS that run under it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def captured_host_reads(model, monkeypatch, **kw) -> list:
    """The HOST_READS operators of the steps that two guided generations capture (graphs stood in by
    `replay_graphs`): the second call captures the first call's warm-ups, the prefill among them."""
    reads = []
    capture = generation.capture_cuda_graph  # the fixture's stand-in

    def watched(fn, pool):
        with HostReads() as watch:
            result = capture(fn, pool)
        reads.extend(watch.seen)
        return result

    monkeypatch.setattr(generation, "capture_cuda_graph", watched)
    kw = dict(class_labels=[0, 2], top_k=20, top_p=0.9, guidance_scale=3.0, cache_implementation="static", **kw)
    for _ in range(2):
        model.generate_video_tokens(generator=torch.Generator().manual_seed(7), **kw)
    return reads


def test_captured_steps_never_read_a_result_on_the_host(replay_graphs, monkeypatch):
    """What CUDA graph capture would refuse, found on CPU: every step the decoder captures (the prefill, token-by-token
    and block steps; guided) runs its device work without an operator whose result the host reads."""
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    assert captured_host_reads(model, monkeypatch) == []
    assert len(replay_graphs) == len(model.layout.decode_schedule(0))
    with HostReads() as watch:  # the watch sees a read where there is one
        bool(torch.ones(2).sum() > 1)
    assert watch.seen == ["_local_scalar_dense"]


def test_cuda_graph_replays_give_the_reference_tokens(replay_graphs):
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    graphs = replay_graphs
    kw = dict(class_labels=[0, 2], top_k=20, top_p=0.9, guidance_scale=3.0)
    reference = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    kw["cache_implementation"] = "static"  # the default on CUDA and CPU
    steps = len(model.layout.decode_schedule(0))
    for call in range(3):  # the graphs are captured in the first call and replayed in the later ones
        fast = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), **kw)
        assert torch.equal(fast, reference)
        # one graph per step; in the first call the first step of each feed length (the prefill, token-by-token
        # and block steps) runs eagerly as the warm-up, and is captured in the next call
        assert len(graphs) == (steps - 3 if call == 0 else steps)
        assert sum(g.replays for g in graphs) == (steps - 3) + call * steps
    # one generator per video: the noise drawn row by row into the graphs' inputs gives the reference's
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    per_video = model.generate_video_tokens(generator=gens(), use_cache=False, class_labels=[0, 2], top_k=20,
                                            top_p=0.9, guidance_scale=3.0)
    assert torch.equal(model.generate_video_tokens(generator=gens(), **kw), per_video)
    assert sum(g.replays for g in graphs) == (steps - 3) + 3 * steps
    other = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), **{**kw, "top_k": 5})
    assert len(graphs) == 2 * steps - 3 and not torch.equal(other, reference)  # new sampling: new graphs
    model.clear_decode_cache()
    assert torch.equal(model.generate_video_tokens(generator=torch.Generator().manual_seed(7), **kw), reference)
    assert len(graphs) == 3 * steps - 6  # captured again
    with pytest.raises(ValueError, match="use_cuda_graphs needs"):
        model.generate_video_tokens(cache_implementation="dynamic", use_cuda_graphs=True, class_labels=[0])


def test_sampling_sweeps_replay_the_same_graphs(replay_graphs):
    """A static decoder reads the temperature, top-p and guidance scale from the device at every step: a sweep over
    them replays the graphs captured once, and each value gives the reference path's tokens."""
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    steps = len(model.layout.decode_schedule(0))
    runs = []
    for temperature, top_p, guidance in ((0.7, 0.9, 3.0), (0.7, 0.9, 3.0), (1.6, 0.6, 1.5), (1e-30, 0.99, 0.5)):
        kw = dict(class_labels=[0, 2], top_k=20, temperature=temperature, top_p=top_p, guidance_scale=guidance)
        fast = model.generate_video_tokens(generator=torch.Generator().manual_seed(7), cache_implementation="static",
                                           **kw)
        runs.append(model.generate_video_tokens(generator=torch.Generator().manual_seed(7), use_cache=False, **kw))
        assert torch.equal(fast, runs[-1])
    assert not torch.equal(runs[0], runs[2]) and not torch.equal(runs[2], runs[3])
    assert len(replay_graphs) == steps  # captured in the second call, replayed in the later ones


def test_static_decoder_follows_weight_updates():
    # the decoder (cache, fused q/k/v weights, graphs) is kept between calls: an in-place update of the weights,
    # as an optimizer makes between sample videos, must reach the next call
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    kw = dict(class_labels=[0, 2], top_k=20, cache_implementation="static")
    model.generate_video_tokens(generator=torch.Generator().manual_seed(3), **kw)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(3.0)
            layer.self_attn.v_proj.bias.add_(0.5)
    fast = model.generate_video_tokens(generator=torch.Generator().manual_seed(3), **kw)
    reference = model.generate_video_tokens(generator=torch.Generator().manual_seed(3), use_cache=False,
                                            **{**kw, "cache_implementation": None})
    assert torch.equal(fast, reference)



def test_a_copy_of_the_model_leaves_out_the_kept_decoder():
    # copy.deepcopy (an EMA model, say) would duplicate the decoder's cache, sized for a whole batch's sequences
    import copy

    model = make_model()
    kw = dict(class_labels=[0], top_k=20, cache_implementation="static")
    tokens = model.generate_video_tokens(generator=torch.Generator().manual_seed(3), **kw)
    stream = model.iter_generation(generator=torch.Generator().manual_seed(3), **kw)
    next(stream)  # a generation under way on the original
    copied = copy.deepcopy(model)
    assert getattr(copied, "_static_decoder", None) is None and model._static_decoder.in_use
    copied.train()  # nor does the copy inherit the original's generation under way: its own mode comes back
    assert torch.equal(copied.generate_video_tokens(generator=torch.Generator().manual_seed(3), **kw), tokens)
    assert copied.training
    for step in stream:
        pass
    assert torch.equal(model.layout.sequence_to_grid(step.video_tokens), tokens)


def test_interleaved_static_generations_do_not_share_a_cache():
    # two generations of one configuration consumed in turn (two streams, say): the second may not reuse the
    # first one's cache while it is still under way
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    kw = dict(top_k=20, cache_implementation="static")
    alone = [model.generate_video_tokens(class_labels=[c], generator=torch.Generator().manual_seed(c), **kw)
             for c in (1, 2)]
    a = model.iter_generation(class_labels=[1], generator=torch.Generator().manual_seed(1), **kw)
    b = model.iter_generation(class_labels=[2], generator=torch.Generator().manual_seed(2), **kw)
    for step_a, step_b in zip(a, b):
        pass
    assert torch.equal(model.layout.sequence_to_grid(step_a.video_tokens), alone[0])
    assert torch.equal(model.layout.sequence_to_grid(step_b.video_tokens), alone[1])
    assert not model._static_decoder.in_use  # released when the generation ends


def test_generations_from_two_threads_do_not_share_a_cache(monkeypatch):
    # a web server's threads calling one model at once: both look for the kept decoder before either has claimed
    # it (held at the cache's reset, where the claim used to come after), and only one may get it
    import threading

    model = make_model(block=(1, 1, 4), first_block="hybrid")
    kw = dict(top_k=20, cache_implementation="static")
    alone = {c: model.generate_video_tokens(class_labels=[c], generator=torch.Generator().manual_seed(c), **kw)
             for c in (1, 2)}
    both_there, reset = threading.Barrier(2, timeout=5), generation.BlockKVCache.reset
    monkeypatch.setattr(generation.BlockKVCache, "reset", lambda cache, m: (both_there.wait(), reset(cache, m)))
    out = {}

    def run(c):
        out[c] = model.generate_video_tokens(class_labels=[c], generator=torch.Generator().manual_seed(c), **kw)

    threads = [threading.Thread(target=run, args=(c,)) for c in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(out[1], alone[1]) and torch.equal(out[2], alone[2])
    assert not model._static_decoder.in_use and model._generations_under_way == 0


def test_interleaved_generations_of_a_model_in_training_mode_sample_in_eval_mode():
    model = make_model(block=(1, 1, 4), first_block="hybrid", hidden_dropout=0.5)
    kw = dict(top_k=20, cache_implementation="dynamic")
    alone = model.generate_video_tokens(class_labels=[2], generator=torch.Generator().manual_seed(2), **kw)
    model.train()
    a = model.iter_generation(class_labels=[1], generator=torch.Generator().manual_seed(1), **kw)
    b = model.iter_generation(class_labels=[2], generator=torch.Generator().manual_seed(2), **kw)
    next(b)
    for _ in a:  # a ends while b is under way: b goes on in eval mode
        pass
    assert not model.training
    for last in b:
        pass
    assert torch.equal(model.layout.sequence_to_grid(last.video_tokens), alone) and model.training


def test_compiled_decode_gives_the_same_tokens():
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    kw = dict(class_labels=[0, 2], cache_implementation="static", guidance_scale=2.0)
    for sampling in (dict(temperature=0.0), dict(top_k=20, top_p=0.9)):
        plain = model.generate_video_tokens(generator=torch.Generator().manual_seed(5), **kw, **sampling)
        compiled = model.generate_video_tokens(generator=torch.Generator().manual_seed(5), compile_decode=True,
                                               **kw, **sampling)
        assert torch.equal(plain, compiled)
    with pytest.raises(ValueError, match="compile_decode needs"):
        model.generate_video_tokens(class_labels=[0], cache_implementation="dynamic", compile_decode=True)
    # torch.compile's own CUDA graphs would nest inside the decoder's
    with pytest.raises(ValueError, match="compile_decode must be True, False or one of"):
        model.generate_video_tokens(class_labels=[0], cache_implementation="static", compile_decode="reduce-overhead")


def test_static_decoder_in_and_out_of_inference_mode(replay_graphs):
    # the kept decoder's tensors (cache, graph inputs) must accept writes from calls in and out of inference mode
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    kw = dict(class_labels=[0], top_k=20, cache_implementation="static")
    with torch.inference_mode():
        inside = model.generate_video_tokens(generator=torch.Generator().manual_seed(1), **kw)
    outside = model.generate_video_tokens(generator=torch.Generator().manual_seed(1), **kw)
    with torch.inference_mode():
        again = model.generate_video_tokens(generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(inside, outside) and torch.equal(outside, again) and replay_graphs


class LowRankAdapter(torch.nn.Module):
    """A LoRA-style wrapper as PEFT makes one: the frozen layer (whose weight it exposes) plus a low-rank update."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.5)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + self.up(self.down(x))


def test_static_path_never_skips_adapters_or_hooks(replay_graphs):
    """The static decode step reads weights instead of calling modules: a module it would skip (an adapter, a
    hook) is refused when the static path is asked for, and the default falls back to the dynamic cache (on CUDA,
    here a stand-in) with a warning, so the tokens are always the model's."""
    model = make_model()
    kw = dict(class_labels=[0, 2], temperature=0)
    reference = model.generate_video_tokens(use_cache=False, **kw)
    attention = model.model.layers[1].self_attn
    attention.v_proj = LowRankAdapter(attention.v_proj)
    adapted = model.generate_video_tokens(use_cache=False, **kw)
    assert not torch.equal(adapted, reference)  # the adapter changes the greedy tokens
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj is a .*LowRankAdapter, not a "
                                         r"torch\.nn\.modules\.linear\.Linear"):
        model.generate_video_tokens(cache_implementation="static", **kw)
    with pytest.warns(UserWarning, match="generating with the dynamic cache"):
        assert torch.equal(model.generate_video_tokens(**kw), adapted)
    assert not replay_graphs
    attention.v_proj = attention.v_proj.base_layer
    hook = model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: 2 * out)
    assert model.static_decode_blockers() == ["model.layers.0.mlp has a forward hook"]
    with pytest.raises(ValueError, match="model.layers.0.mlp has a forward hook"):
        model.generate_video_tokens(cache_implementation="static", **kw)
    hook.remove()
    hook = model.register_forward_pre_hook(lambda module, args: None)  # the model's own forward: decode steps skip it
    assert model.static_decode_blockers() == ["the model has a forward hook"]
    hook.remove()
    assert model.static_decode_blockers() == []
    assert torch.equal(model.generate_video_tokens(**kw), reference) and replay_graphs  # the fast path again
    model.model.layers[1].to("meta")  # stands in for a second device (a device_map split)
    assert model.static_decode_blockers() == ["the parameters lie on several devices (cpu, meta)"]
    with pytest.raises(ValueError, match=r"the parameters lie on several devices \(cpu, meta\)"):
        model.generate_video_tokens(cache_implementation="static", **kw)


@pytest.mark.parametrize("path", [dict(use_cache=False), dict(cache_implementation="dynamic"),
                                  dict(cache_implementation="static", use_cuda_graphs=False),
                                  dict(cache_implementation="static", use_cuda_graphs=True)])
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])  # with guidance the combined logits are the ones checked
def test_nan_logits_raise_a_clear_error(path, guidance_scale, replay_graphs):
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    poisoned = model.config.video_token_offset + 3
    kw = dict(class_labels=[0], top_k=20, guidance_scale=guidance_scale, **path)
    with torch.no_grad():
        model.lm_head.weight[poisoned] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite logits"):
        model.generate_video_tokens(**kw)
    steps = model.iter_generation(**kw)
    next(steps), next(steps)
    with pytest.raises(FloatingPointError, match="NaN or infinite logits"):  # a consumer that stops early is told too
        steps.close()
    with torch.no_grad():
        model.lm_head.weight[poisoned] = 0.0
    model.generate_video_tokens(**kw)  # a static decoder was released: runs again
    assert not path.get("use_cuda_graphs") or replay_graphs  # the graph path was taken


def test_forward_refuses_a_preallocated_transformers_cache():
    from transformers.cache_utils import StaticCache

    model = make_model()
    cache = StaticCache(config=model.config, max_cache_len=model.layout.sequence_length)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("implementation", ["chunked", "triton"])  # triton: under the interpreter on CPU
@pytest.mark.parametrize("vocab", [50, 5000])  # 5000: more than one load of the kernel, the last one partial
def test_loss_equals_cross_entropy(implementation, vocab):
    from modeling_nbp.modeling_nbp import next_block_loss

    torch.manual_seed(0)
    logits = (torch.randn(3, 37, vocab) * 3).requires_grad_()
    labels = torch.randint(0, vocab, (3, 37))
    labels[0, :5] = labels[2, 30:] = -100
    labels[1, 0] = vocab - 1
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    (3 * reference).backward()
    # chunks that cut through rows of the batch
    loss = next_block_loss(logits, labels, chunk_rows=16, implementation=implementation)
    (3 * loss).backward()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits.grad, reference_logits.grad, atol=1e-7, rtol=1e-5)
    assert next_block_loss(logits.detach(), torch.full_like(labels, -100), implementation=implementation) == 0
    again = next_block_loss(logits, labels, implementation=implementation)  # its gradient is scaled in place
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="supports one backward pass"):
        again.backward()
    summed = next_block_loss(logits.detach(), labels, num_items_in_batch=torch.tensor(4 * 100),
                             implementation=implementation)
    torch.testing.assert_close(summed, reference.detach() * int((labels != -100).sum()) / 400)
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {vocab}\) or be -100 \(no target\); got {bad}"):
            next_block_loss(logits, labels.index_fill(1, torch.tensor([3]), bad), implementation=implementation)
    if implementation == "chunked" and vocab == 50:
        with pytest.raises(ValueError, match=r"implementation must be one of \('chunked', 'triton'\), got 'fused'"):
            next_block_loss(logits, labels, implementation="fused")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_loss_in_half_precision_equals_the_chunked_one(dtype):
    from modeling_nbp.modeling_nbp import next_block_loss

    torch.manual_seed(1)
    logits = (torch.randn(2, 9, 4500) * 4).to(dtype)
    logits[0, 2, 7] = 60.0  # one dominant code: its probability rounds near 1
    labels = torch.randint(0, 4500, (2, 9))
    labels[0, 2], labels[1, 3] = 7, -100
    grads = {}
    for implementation in ("chunked", "triton"):
        x = logits.clone().requires_grad_()
        loss = next_block_loss(x, labels, implementation=implementation)
        loss.backward()
        grads[implementation] = (loss.detach(), x.grad)
    assert grads["triton"][1].dtype == dtype
    torch.testing.assert_close(grads["triton"][0], grads["chunked"][0], atol=1e-5, rtol=1e-5)
    # both round the same float32 gradient once: at most one unit in the last place apart (their float32 sums differ
    # in order)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(grads["triton"][1], grads["chunked"][1], atol=1e-6, rtol=ulp)
    assert grads["triton"][1][1, 3].abs().max() == 0  # an ignored position gets no gradient


def test_triton_loss_of_strided_labels():
    from modeling_nbp.modeling_nbp import next_block_loss

    logits = torch.randn(3, 1, 50, generator=torch.Generator().manual_seed(0))
    table = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    for labels in (table[:, :1], torch.tensor(7).expand(3, 1)):  # a column of a table; one label broadcast
        torch.testing.assert_close(next_block_loss(logits, labels, implementation="triton"),
                                   next_block_loss(logits, labels, implementation="chunked"))


def test_triton_loss_inside_a_compiled_function():
    """torch.compile (as `nbp bench --train --compile` wraps the model) runs the kernel as it is, between graphs."""
    from modeling_nbp.modeling_nbp import next_block_loss

    torch.manual_seed(2)
    logits, labels = torch.randn(2, 5, 40), torch.randint(0, 40, (2, 5))
    grads = []
    for loss_fn in (lambda x: next_block_loss(x.tanh() * 3, labels),
                    torch.compile(lambda x: next_block_loss(x.tanh() * 3, labels, implementation="triton"))):
        x = logits.clone().requires_grad_()
        loss = loss_fn(x)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["chunked", "triton"])
def test_the_model_trains_with_either_loss(implementation):
    model = make_model().eval()  # eval: no dropout, so both passes compute the same function
    model.loss_implementation = implementation
    with pytest.raises(ValueError, match="loss_implementation must be one of"):
        model.loss_implementation = "liger"
    assert model.loss_implementation == implementation
    video, classes = grid(model), torch.tensor([0, 2])
    model(video_ids=video, class_labels=classes).loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    input_ids, labels = model.prepare_training_inputs(video, classes)
    logits = model(input_ids=input_ids).logits
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused[name], p.grad, atol=1e-6, rtol=1e-4)


def test_forward_follows_the_transformers_conventions():
    from transformers.cache_utils import DynamicCache

    model = make_model()
    video, classes = grid(model), torch.tensor([0, 2])
    input_ids, labels = model.prepare_training_inputs(video, classes)
    out = model(input_ids=input_ids, labels=labels)
    # Trainer's gradient accumulation: the summed loss over the accumulated batch's labelled positions
    count = int((labels != -100).sum())
    summed = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(4 * count)).loss
    torch.testing.assert_close(summed, out.loss / 4)
    assert NBPForVideoGeneration.accepts_loss_kwargs
    # a 2-D mask of ones is the layout's mask; one with padding is refused; a 4-D mask replaces the layout's
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits, out.logits)
    with pytest.raises(ValueError, match="without padding"):
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids).index_fill_(1, torch.tensor([0]), 0))
    L = input_ids.shape[1]
    full = torch.ones(2, 1, L, L, dtype=torch.bool)
    assert not torch.allclose(model(input_ids=input_ids, attention_mask=full).logits, out.logits)
    with pytest.raises(ValueError, match="must be boolean .* or floating point"):  # an int 0/1 mask would be a bias
        model(input_ids=input_ids, attention_mask=full.long())
    with pytest.raises(ValueError, match=rf"must have shape .* = \(2, 1, {L}, {L}\)"):
        model(input_ids=input_ids, attention_mask=full[..., 1:])
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=full.expand(2, 4, L, L)).logits,
                               model(input_ids=input_ids, attention_mask=full).logits)  # one mask per head
    with pytest.raises(ValueError, match=r"\(batch or 1, 1 or heads, query, key\).*; got \(2, 3, "):
        model(input_ids=input_ids, attention_mask=full.expand(2, 3, L, L))  # 4 heads
    # past_key_values is the cache; the loss comes first in the tuple form
    cache = DynamicCache(config=model.config)
    assert model(input_ids=input_ids[:, :5], past_key_values=cache).past_key_values is cache  # and the output's
    torch.testing.assert_close(model(input_ids=input_ids[:, 5:9], past_key_values=cache).logits, out.logits[:, 5:9],
                               atol=1e-5, rtol=1e-5)
    loss, logits = model(input_ids=input_ids, labels=labels, return_dict=False)[:2]
    torch.testing.assert_close(loss, out.loss)
    with pytest.raises(TypeError, match="position_ids"):
        model(input_ids=input_ids, position_ids=torch.arange(L)[None])
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=input_ids, output_attentions=True)
    # hidden states as in transformers' decoders: the embeddings, then each layer's output, the last one normed
    seen = []
    hooks = [layer.register_forward_hook(lambda m, args, kwargs, output: seen.append((args[0], output)),
                                         with_kwargs=True) for layer in model.model.layers]
    states = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    assert len(states) == model.config.num_hidden_layers + 1 and out.hidden_states is None
    assert torch.equal(states[0], seen[0][0]) and all(torch.equal(a, b[1]) for a, b in zip(states[1:-1], seen))
    torch.testing.assert_close(states[-1], out.last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_static_path_gives_the_dynamic_tokens(dtype):
    # sampling ranks the half-precision logits directly (only the kept ones go to float32)
    model = make_model(block=(1, 1, 4), first_block="hybrid").to(dtype)
    for sampling in (dict(top_k=20, top_p=0.9), dict(top_p=0.8), dict(top_k=20, guidance_scale=2.0)):
        dynamic, static = (model.generate_video_tokens(class_labels=[0, 2], generator=torch.Generator().manual_seed(1),
                                                       cache_implementation=c, **sampling)
                           for c in ("dynamic", "static"))
        assert torch.equal(dynamic, static)


@pytest.mark.parametrize("kw", [dict(first_block="hybrid"), dict(first_block="bov"),
                                dict(mode="frames", first_block="none", num_context_frames=1)])
def test_static_prefill_gives_the_forward_logits(kw):
    """The static path's prefill (a step with the layout's block-causal mask, the unconditional prefix in the rows
    that drop the condition) computes the forward's logits, and the keys and values that later steps read."""
    model = make_model(**kw)
    ids, _ = model.prepare_training_inputs(grid(model), None if kw.get("mode") else [0, 1])
    n, P = ids.shape[1] - 4, model.layout.prefix_length
    drop = torch.tensor([False, True]) if P else None
    cache = generation.BlockKVCache(model, 2)
    cache.reset(model)
    mask = model.layout.allowed(0, n)
    prefill = model.decode_block_logits(cache, ids[:, :n], 0, slice(0, n), mask=mask, drop=drop)
    step = model.decode_block_logits(cache, ids[:, n:], n, slice(0, 4))  # a decode step reading the prefill's cache
    full = model(input_ids=ids, drop_condition=drop).logits
    off, V = model.config.video_token_offset, model.config.video_vocab_size
    assert torch.allclose(prefill, full[:, :n, off : off + V], atol=1e-5)
    assert model.layout.needs_mask(0, n) and not model.layout.needs_mask(n, n + 4)
    # the last 4 positions are one block (or the end of one: they may see each other), as the step assumes
    assert torch.allclose(step, full[:, n:, off : off + V], atol=1e-5)
    if P:  # the unconditional row differs from what it would give with its condition
        assert not torch.allclose(prefill[1], model.decode_block_logits(cache, ids[:, :n], 0, slice(0, n),
                                                                        mask=mask)[1], atol=1e-3)


def test_static_path_under_autocast_gives_the_dynamic_tokens():
    # the prefill writes its bf16 keys into the float32 block cache and attends to them in bf16, as the dynamic path
    model = make_model(block=(1, 1, 4), first_block="hybrid")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dynamic, static = (model.generate_video_tokens(class_labels=[0, 2], generator=torch.Generator().manual_seed(1),
                                                       cache_implementation=c, top_k=20) for c in ("dynamic", "static"))
    assert torch.equal(dynamic, static)


def test_static_cache_frame_prediction_equals_reference():
    model = make_model(mode="frames", first_block="none", num_context_frames=1)
    kw = dict(context_ids=grid(model)[:, :1], top_k=10)
    fast = model.generate_video_tokens(generator=torch.Generator().manual_seed(2), cache_implementation="static", **kw)
    assert torch.equal(fast, model.generate_video_tokens(generator=torch.Generator().manual_seed(2), use_cache=False, **kw))
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate_video_tokens(cache_implementation="paged", **kw)
