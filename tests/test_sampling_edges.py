"""Edge cases of the sampling arguments of generate() / generate_video_tokens / iter_generation."""

import pytest
import torch
from transformers import GenerationConfig

from modeling_nbp import generation
from test_modeling_nbp import make_model


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_a_generation_config_given_to_generate_overrides_the_models_own():
    # the model's own config would be refused (num_return_sequences), but the config given overrides that field
    model = make_model()
    model.generation_config.num_return_sequences = 2
    given = GenerationConfig(do_sample=True, top_k=5, num_return_sequences=1)
    tokens = model.generate(class_labels=[0], generation_config=given, generator=seeded())
    assert torch.equal(tokens, model.generate_video_tokens(class_labels=[0], top_k=5, top_p=0.9, temperature=1.0,
                                                           guidance_scale=1.0, generator=seeded()))
    for config in (None, GenerationConfig(top_k=5)):  # still refused where it is read
        with pytest.raises(ValueError, match="num_return_sequences"):
            model.generate(class_labels=[0], generation_config=config, top_k=5)


def test_the_fields_a_given_generation_config_leaves_unset_come_from_the_models_own():
    # transformers' order: the call's arguments, the config given, the model's config, the defaults
    model = make_model(latent=(2, 4, 4))
    model.generation_config.update(do_sample=True, top_k=5, temperature=0.7)
    tokens = model.generate(class_labels=[0], generation_config=GenerationConfig(top_p=0.8, top_k=7),
                            generator=seeded())
    assert torch.equal(tokens, model.generate_video_tokens(class_labels=[0], top_k=7, top_p=0.8, temperature=0.7,
                                                           generator=seeded()))


def test_do_sample_false_in_the_call_is_greedy_whatever_sampling_values_it_gives():
    model = make_model(latent=(2, 4, 4))
    greedy = model.generate_video_tokens(class_labels=[1], temperature=0)
    with pytest.warns(UserWarning, match=r"do_sample=False: greedy decoding ignores temperature=0.7, top_k=5"):
        tokens = model.generate(class_labels=[1], do_sample=False, temperature=0.7, top_k=5, generator=seeded())
    assert torch.equal(tokens, greedy)
    # the same from a config given to the call (transformers updates it with the call's values)
    config = GenerationConfig(do_sample=False)
    with pytest.warns(UserWarning, match="do_sample=False"):
        assert torch.equal(model.generate(class_labels=[1], generation_config=config, top_p=0.5), greedy)


@pytest.mark.parametrize("path", [dict(use_cache=False), dict(cache_implementation="dynamic"),
                                  dict(cache_implementation="static")])
def test_a_guidance_scale_that_overflows_the_logits_raises(path):
    # uncond + g (cond - uncond) beyond float32's range: NaN / inf logits would sample one token everywhere
    model = make_model(first_block="hybrid", latent=(2, 4, 4))
    for temperature in (0.0, 1.0):
        with pytest.raises(FloatingPointError, match=r"guidance_scale=1e\+39 .* overflows"):
            model.generate_video_tokens(class_labels=[0, 1], guidance_scale=1e39, temperature=temperature, **path)
    tokens = model.generate_video_tokens(class_labels=[0, 1], guidance_scale=1e30, generator=seeded(), **path)
    assert tokens.unique().numel() > 1


def test_bad_generators_are_named():
    model = make_model()
    for bad in (42, "seed", [seeded(), 3]):
        with pytest.raises(TypeError, match=r"generator must be a torch.Generator, a list of one per video"):
            model.generate_video_tokens(class_labels=[0, 1], generator=bad)
    with pytest.raises(ValueError, match=r"generator: got 1 generators for a batch of 2"):
        model.generate_video_tokens(class_labels=[0, 1], generator=[seeded()])


def test_a_temperature_below_float32s_range_is_greedy():
    # 1e-46 and smaller round to 0 in float32: dividing by them gave NaN probabilities and arbitrary tokens
    model = make_model(latent=(2, 4, 4))
    greedy = model.generate_video_tokens(class_labels=[0, 1], temperature=0)
    for temperature in (1e-46, 5e-324):
        tokens = model.generate_video_tokens(class_labels=[0, 1], temperature=temperature, generator=seeded())
        assert torch.equal(tokens, greedy)
    logits = torch.randn(4, 50, generator=seeded())
    for fused in (False, True):  # the fused sampler (Triton, under its interpreter on CPU) divides in float32 too
        if fused:
            pytest.importorskip("triton")
        tokens = generation.sample_tokens(logits, temperature=1e-50, top_k=20, fused=fused, generator=seeded())
        assert torch.equal(tokens, logits.argmax(-1))


def test_a_bad_value_of_a_config_given_to_generate_is_named_as_that_configs():
    model = make_model()
    with pytest.raises(ValueError, match=r"top_p was not passed to this call: it came from the generation_config given "
                                         r"to generate\(\) \(or the model's"):
        model.generate(class_labels=[0], generation_config=GenerationConfig(do_sample=True, top_p=0.0))
    model.generation_config.top_p = 0.0
    with pytest.raises(ValueError, match="it came from the model's generation_config"):
        model.generate(class_labels=[0], do_sample=True)


def test_the_sampling_noise_is_float32_whatever_the_default_dtype():
    # under torch.set_default_dtype(torch.bfloat16) the uniform noise had 8 bits: about 1300 values in [0, 1)
    model = make_model(latent=(2, 4, 4))
    expected = model.generate_video_tokens(class_labels=[0, 1], top_k=10, generator=seeded())
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert generation._noise((8,), seeded(), "cpu").dtype == torch.float32
        for path in ("static", "dynamic"):
            tokens = model.generate_video_tokens(class_labels=[0, 1], top_k=10, generator=seeded(),
                                                 cache_implementation=path)
            assert torch.equal(tokens, expected)
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_generation_configs_cache_implementation_is_used():
    # transformers' `model.generation_config.cache_implementation = "static"` pattern (was refused as unsupported)
    model = make_model(latent=(2, 4, 4))
    model.generation_config.cache_implementation = "dynamic"
    tokens = model.generate_video_tokens(class_labels=[0], generator=seeded())
    assert getattr(model, "_static_decoder", None) is None  # the static path keeps its decoder on the model
    model.generate(class_labels=[0], generation_config=GenerationConfig(cache_implementation="static"))
    assert model._static_decoder is not None
    model.clear_decode_cache()
    assert torch.equal(model.generate(class_labels=[0], generator=seeded(), cache_implementation="static"), tokens)
    assert model._static_decoder is not None  # the call's value comes first
    model.generation_config.cache_implementation = "offloaded"
    with pytest.raises(ValueError, match=r"got 'offloaded' \(from the model's generation_config\)"):
        model.generate_video_tokens(class_labels=[0])


def test_all_finite_finds_every_kind_of_non_finite_value():
    # the steps' logit check: one min/max reduction instead of a mask of the whole logits
    from modeling_nbp.value_checks import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3, 5, 70).to(dtype)
        assert all_finite(x) and all_finite(x[:0])
        for bad in (float("nan"), float("inf"), -float("inf")):
            for at in ((0, 0, 0), (2, 4, 69), (1, 2, 33)):
                y = x.clone()
                y[at] = bad
                assert not all_finite(y), (dtype, bad, at)
