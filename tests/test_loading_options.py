"""The loading and saving options that transformers and diffusers users pass, on tiny models in temp folders: each
gives the plain load's outputs, or is refused with a message that names it."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import AutoModel

from test_modeling_nbp import grid, make_model
from test_pipeline import gen, tiny_pipeline
from modeling_nbp import NBPConfig, NBPForVideoGeneration, NBPVideoPipeline, NBPVideoTokenizer


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


def test_the_installed_classes_run_no_code_from_a_folder(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)  # carries its code, here made to fail if imported
    for code in tmp_path.rglob("*.py"):
        code.write_text("raise RuntimeError('code of the folder ran')\n" + code.read_text())
    for kwargs in ({}, dict(trust_remote_code=True)):  # as diffusers users pass it: accepted, nothing to trust
        loaded = NBPVideoPipeline.from_pretrained(tmp_path, **kwargs)
        assert type(loaded) is NBPVideoPipeline


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
    with pytest.raises(FileNotFoundError, match=r"config.json\): a training run's pipeline is its final/ folder "
                                                r"\(with a tokenizer: `nbp train --tokenizer`\); "
                                                r".*NBPVideoTokenizer.from_pretrained"):
        NBPVideoPipeline.from_pretrained(tmp_path / "tokenizer")
    # the given component needs no folder
    assert NBPVideoPipeline.from_pretrained(tmp_path / "tokenizer" / "..", transformer=pipe.transformer,
                                            video_tokenizer=pipe.video_tokenizer).transformer is pipe.transformer


def downloaded(hub) -> list[str]:
    """The repo paths of the files `hub` served since the last call (and forgets them)."""
    with hub._state.lock:
        requests, hub._state.requests[:] = list(hub._state.requests), []
    return sorted({path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in requests
                   if method == "GET" and "/resolve/" in path})


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for name in ("transformer", "video_tokenizer")
               for x, y in zip(getattr(a, name).state_dict().values(), getattr(b, name).state_dict().values()))


def test_a_hub_pipeline_downloads_only_what_it_loads(local_hub, monkeypatch, tmp_path):
    """Was the whole repo: both variants' weights, the carried code, and a component passed in (the 1.4 GB generator
    for a swapped-in one); a model repo was downloaded before being refused, and a missing repo or revision was
    reported as "404 Client Error."."""
    from hub_server import set_hub_offline

    pipe = tiny_pipeline()
    pipe.push_to_hub("test-user/pipe")
    pipe.push_to_hub("test-user/pipe", variant="fp16")
    pipe.transformer.push_to_hub("test-user/generator")
    downloaded(local_hub)
    configs = ["model_index.json", "transformer/config.json", "transformer/generation_config.json",
               "video_tokenizer/config.json"]
    loaded = NBPVideoPipeline.from_pretrained("test-user/pipe")
    assert downloaded(local_hub) == sorted([*configs, "transformer/model.safetensors",
                                            "video_tokenizer/diffusion_pytorch_model.safetensors"])
    assert loaded.name_or_path == "test-user/pipe" and same_weights(loaded, pipe)
    NBPVideoPipeline.from_pretrained("test-user/pipe", variant="fp16", cache_dir=tmp_path / "other")
    assert downloaded(local_hub) == sorted([*configs, "transformer/model.fp16.safetensors",
                                            "video_tokenizer/diffusion_pytorch_model.fp16.safetensors"])
    NBPVideoPipeline.from_pretrained("test-user/pipe", transformer=pipe.transformer, cache_dir=tmp_path / "third")
    assert downloaded(local_hub) == ["model_index.json", "video_tokenizer/config.json",
                                     "video_tokenizer/diffusion_pytorch_model.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"the Hub repo 'test-user/generator' is not an NBPVideoPipeline repo "
                                                r"\(no transformer/config.json, .*NBPForVideoGeneration"):
        NBPVideoPipeline.from_pretrained("test-user/generator")
    assert downloaded(local_hub) == []
    with pytest.raises(OSError, match=r"'test-user/none' .* nor a Hub repo that could be downloaded: no such repo, or "
                                      r"a private or gated one"):
        NBPVideoPipeline.from_pretrained("test-user/none")
    with pytest.raises(OSError, match=r"could be downloaded: the repo has no revision 'v2'"):
        NBPVideoPipeline.from_pretrained("test-user/pipe", revision="v2")
    # offline, the cache of a partial download is enough for what it holds
    local_hub.stop()
    set_hub_offline(monkeypatch)
    assert same_weights(NBPVideoPipeline.from_pretrained("test-user/pipe"), pipe)


def test_a_model_of_the_other_kind_is_named(local_hub, tmp_path):
    """`--tokenizer` given a generator (or `--init_from` a tokenizer) failed in diffusers ("no file named
    diffusion_pytorch_model.bin") or in the config ("condition_mode='class' needs num_classes > 0"); a Hub repo's
    other variants' weights were downloaded too."""
    from modeling_nbp.data.pretokenize import tokenizer_folder
    from modeling_nbp.training.train_nbp import generator_folder

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "run" / "final").mkdir(parents=True)
    pipe.push_to_hub("test-user/pipe")
    pipe.push_to_hub("test-user/pipe", variant="fp16")
    pipe.transformer.push_to_hub("test-user/generator")
    downloaded(local_hub)
    assert tokenizer_folder("test-user/pipe").endswith("video_tokenizer")
    assert not [f for f in downloaded(local_hub) if "fp16" in f or f.startswith("transformer/")]
    for find, source, message in (
            (tokenizer_folder, "test-user/generator", "tokenizer 'test-user/generator' is an NBP generator, not an NBP "
                                                      "video tokenizer"),
            (tokenizer_folder, tmp_path / "pipe" / "transformer", "is an NBP generator, not an NBP video tokenizer"),
            (generator_folder, tmp_path / "pipe" / "video_tokenizer", "--init_from .* is an NBP video tokenizer, not "
                                                                      "an NBP generator"),
            (generator_folder, tmp_path / "run", r"is not an NBP generator or a pipeline holding one: it has no "
                                                 r"readable config.json or transformer/config.json: a training "
                                                 r"run's model is in .*final")):
        with pytest.raises(OSError, match=message):
            find(source)


def test_a_model_is_not_loaded_from_a_folder_without_its_config(tmp_path):
    """A pipeline folder (or a tokenizer's) given to NBPForVideoGeneration.from_pretrained: transformers read no
    config.json as an empty one, and the defaults failed with "condition_mode='class' needs num_classes > 0"."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    with pytest.raises(OSError, match=r"has no config.json, so it holds no NBP generator; in a pipeline"):
        NBPForVideoGeneration.from_pretrained(tmp_path)
    with pytest.raises(OSError, match=r"video_tokenizer holds the config of NBPVideoTokenizer, not of an NBP "
                                      r"generator; in a pipeline .* subfolder='transformer'"):
        NBPForVideoGeneration.from_pretrained(tmp_path, subfolder="video_tokenizer")
    loaded = NBPForVideoGeneration.from_pretrained(tmp_path, subfolder="transformer")
    assert loaded.config.latent_shape == pipe.transformer.config.latent_shape
    # the tokenizer's: diffusers said "no file named diffusion_pytorch_model.bin" for a generator's folder
    with pytest.raises(OSError, match=r"is a pipeline folder: in a pipeline .* subfolder='video_tokenizer'"):
        NBPVideoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(OSError, match=r"transformer holds the config of a transformers model \(nbp\), not of a video "
                                      r"tokenizer; in a pipeline"):
        NBPVideoTokenizer.from_pretrained(tmp_path, subfolder="transformer")


def test_command_line_sources_take_a_hub_revision(local_hub, tmp_path):
    """`--tokenizer_revision` / `--init_from_revision` pin the version of a Hub repo that `nbp pretokenize`,
    `nbp train` and `nbp train-tokenizer` start from (they took the default branch, whatever was pushed since)."""
    from modeling_nbp.data.pretokenize import main as pretokenize_main
    from modeling_nbp.data.pretokenize import tokenizer_folder
    from modeling_nbp.training import train_nbp, train_tokenizer

    pipe = tiny_pipeline()
    first = pipe.push_to_hub("test-user/pipe").oid
    old = {k: t.clone() for k, t in pipe.video_tokenizer.state_dict().items()}
    with torch.no_grad():
        for tensor in [*pipe.video_tokenizer.parameters(), *pipe.transformer.parameters()]:
            tensor.add_(1)
    pipe.push_to_hub("test-user/pipe")
    for revision, expected in ((first, old), (None, pipe.video_tokenizer.state_dict())):
        loaded = NBPVideoTokenizer.from_pretrained(tokenizer_folder("test-user/pipe", revision))
        assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
    loaded = NBPForVideoGeneration.from_pretrained(train_nbp.generator_folder("test-user/pipe", first))
    assert not torch.equal(loaded.lm_head.weight, pipe.transformer.lm_head.weight)
    with pytest.raises(OSError, match=r"the repo has no revision 'v9'"):
        pretokenize_main(["--data", str(tmp_path), "--tokenizer", "test-user/pipe", "--tokenizer_revision", "v9",
                          "--output_dir", str(tmp_path / "tokens")])
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"a revision selects a version of a Hub repo; tokenizer '.*pipe' is a local"):
        tokenizer_folder(tmp_path / "pipe", first)
    with pytest.raises(ValueError, match=r"--init_from_revision is a version of --init_from's Hub repo; give"):
        train_nbp.parse_args(["--train_data", "t", "--output_dir", "o", "--init_from_revision", first])
    with pytest.raises(ValueError, match=r"--init_from_revision is a version of --init_from's Hub repo; give"):
        train_tokenizer.parse_args(["--dataset", "moving_digits", "--output_dir", "o", "--init_from_revision", first])
