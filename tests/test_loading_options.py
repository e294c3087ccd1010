"""The loading and saving options that transformers and diffusers users pass, on tiny models in temp folders: each
gives the plain load's outputs, or is refused with a message that names it."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import AutoModel

from test_modeling_nbp import grid, make_model
from test_pipeline import gen, tiny_pipeline
from modeling_nbp import NBPConfig, NBPForVideoGeneration, NBPVideoPipeline


def test_model_loading_options_give_the_plain_load_outputs(tmp_path):
    model = make_model(first_block="hybrid").half().float()  # weights that float16 holds exactly
    inputs, _ = model.prepare_training_inputs(grid(model), [0, 1])
    expected = model(input_ids=inputs).logits
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    model.save_pretrained(tmp_path / "variant", variant="fp16")
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    model.half().save_pretrained(tmp_path / "half")
    model.float()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    plain = str(tmp_path / "plain")
    loads = {
        "sharded": NBPForVideoGeneration.from_pretrained(tmp_path / "sharded"),
        "variant": NBPForVideoGeneration.from_pretrained(tmp_path / "variant", variant="fp16"),
        "subfolder": AutoModel.from_pretrained(tmp_path / "pipe", subfolder="transformer"),
        "device_map": NBPForVideoGeneration.from_pretrained(plain, device_map="auto", low_cpu_mem_usage=True),
        "eager": NBPForVideoGeneration.from_pretrained(plain, attn_implementation="eager"),
        "config": NBPForVideoGeneration.from_pretrained(plain, config=NBPConfig.from_pretrained(plain)),
    }
    for name, loaded in loads.items():
        torch.testing.assert_close(loaded(input_ids=inputs).logits, expected, msg=name)
    for dtype, kw in ((torch.float16, dict(dtype="auto")), (torch.bfloat16, dict(torch_dtype=torch.bfloat16))):
        loaded = NBPForVideoGeneration.from_pretrained(tmp_path / ("half" if dtype == torch.float16 else "plain"), **kw)
        assert loaded.dtype == dtype
        torch.testing.assert_close(loaded(input_ids=inputs).logits.float(), expected, atol=0.01, rtol=0)  # bf16: 3e-3
    with pytest.raises(ValueError, match='attn_implementation="foo"` is not supported'):
        NBPForVideoGeneration.from_pretrained(plain, attn_implementation="foo")
    with pytest.raises(ValueError, match="tie_word_embeddings must be False"):
        NBPForVideoGeneration.from_pretrained(plain, tie_word_embeddings=True)


def test_output_loading_info_returns_the_model_and_its_report(tmp_path):
    # transformers returns (model, loading_info): the generation config is read into the model, not the pair
    model = make_model()
    model.generation_config.update(do_sample=True, top_k=5)
    model.save_pretrained(tmp_path)
    for load in (NBPForVideoGeneration.from_pretrained, AutoModel.from_pretrained):
        loaded, info = load(tmp_path, output_loading_info=True)
        assert isinstance(loaded, NBPForVideoGeneration) and loaded.generation_config.top_k == 5
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_a_new_video_vocabulary_names_the_vocab_size_it_needs(tmp_path):
    # vocab_size is saved with a model, so a larger video_vocab_size alone does not fit: the message says how large
    saved = make_model(first_block="hybrid")  # ids: BOV/placeholders 0-3, classes 4-6, video 7-46
    saved.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"video ids \[7, 57\) do not fit in vocab_size 47: give vocab_size >= 57"):
        NBPForVideoGeneration.from_pretrained(tmp_path, video_vocab_size=50, ignore_mismatched_sizes=True)
    model = NBPForVideoGeneration.from_pretrained(tmp_path, video_vocab_size=50, vocab_size=57,
                                                  ignore_mismatched_sizes=True)
    assert model.lm_head.weight.shape[0] == 57 and model.generate_video_tokens(class_labels=[0]).shape == (1, 3, 4, 4)
    assert torch.equal(model.model.layers[0].mlp.fc1.weight, saved.model.layers[0].mlp.fc1.weight)


def test_pipeline_loading_options_round_trip(tmp_path):
    pipe = tiny_pipeline()
    expected = pipe(class_labels=[1], generator=gen(2), output_type="np").frames
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    pipe.save_pretrained(tmp_path / "variant", variant="fp16")
    assert len(list((tmp_path / "sharded" / "video_tokenizer").glob("*.safetensors"))) > 1
    loads = [NBPVideoPipeline.from_pretrained(tmp_path / "sharded"),
             NBPVideoPipeline.from_pretrained(tmp_path / "variant", variant="fp16"),
             DiffusionPipeline.from_pretrained(tmp_path / "variant", variant="fp16", trust_remote_code=True),
             NBPVideoPipeline.from_pretrained(tmp_path / "sharded", use_safetensors=True, force_download=False),
             NBPVideoPipeline.from_pretrained(tmp_path / "sharded", transformer=pipe.transformer)]
    assert loads[-1].transformer is pipe.transformer
    for loaded in loads:
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(loaded(class_labels=[1], generator=gen(2), output_type="np").frames, expected)
    loaded = loads[0].to("cpu", torch.bfloat16)
    assert (loaded.transformer.dtype, loaded.video_tokenizer.dtype) == (torch.bfloat16,) * 2
    for where in (tmp_path / "sharded", tmp_path / "not-there"):  # refused before anything is read or downloaded
        with pytest.raises(TypeError, match=r"unexpected arguments for NBPVideoPipeline.from_pretrained: "
                                            r"\['device_map'\] \(it takes .*dtype.*; place the pipeline with pipe.to"):
            NBPVideoPipeline.from_pretrained(where, device_map="cpu")


def test_pipeline_components_that_do_not_fit_are_refused():
    pipe = tiny_pipeline()
    tok, codes = pipe.video_tokenizer, pipe.video_tokenizer.codebook_size
    with pytest.raises(TypeError, match="transformer must be an NBPForVideoGeneration .* got NBPVideoTokenizer and "
                                        "NBPForVideoGeneration"):
        NBPVideoPipeline(tok, pipe.transformer)  # swapped
    # a generator made for another tokenizer: refused before generating, for fewer video ids (frames decoded from
    # other codes) and for more (decoding would fail after the whole generation)
    for vocab in (codes - 1, codes + 1):
        config = {**pipe.transformer.config.to_diff_dict(), "video_vocab_size": vocab, "vocab_size": None,
                  "video_token_offset": None}
        other = NBPVideoPipeline(transformer=NBPForVideoGeneration(NBPConfig(**config)), video_tokenizer=tok)
        with pytest.raises(ValueError, match=rf"transformer's video_vocab_size \({vocab}\) must equal the "
                                             rf"video_tokenizer's codebook_size \({codes}\)"):
            other(class_labels=[0])


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path):
    """A training run's folder (its pipeline is in final/) or one model's folder: was transformers' "Repo id must be
    in the form ..." error for '<folder>/transformer', or a Hub retry loop for a one-word relative name."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "run" / "final")
    with pytest.raises(FileNotFoundError, match=r"run is not an NBPVideoPipeline folder \(no transformer/config.json, "
                                                r"video_tokenizer/config.json\): its pipeline is .*final"):
        NBPVideoPipeline.from_pretrained(tmp_path / "run")
    pipe.video_tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"config.json\): a training run's pipeline is its final/ folder; .*"
                                                r"NBPVideoTokenizer.from_pretrained"):
        NBPVideoPipeline.from_pretrained(tmp_path / "tokenizer")
    # the given component needs no folder
    assert NBPVideoPipeline.from_pretrained(tmp_path / "tokenizer" / "..", transformer=pipe.transformer,
                                            video_tokenizer=pipe.video_tokenizer).transformer is pipe.transformer
