"""`nbp convert`: official NBP checkpoints -> a diffusers-style pipeline folder (safetensors), optionally pushed.

    nbp convert --generator ucf_base_nbp16_hybrid.ckpt --tokenizer magvit2_ucf.pt --output nbp-ucf-700m
    nbp convert --generator k600_3b_nbp16.ckpt --tokenizer magvit2_k600.pt --output nbp-k600-3b --dtype bfloat16

The folder is an `NBPVideoPipeline` (`NBPVideoPipeline.from_pretrained(folder)`): `transformer/`
(`NBPForVideoGeneration`), `video_tokenizer/` (`NBPVideoTokenizer`), model_index.json. Converting only one of the
two writes just its subfolder. The frozen tokenizer copy that a generator checkpoint may embed
(`first_stage_model.*`) is skipped, or converted as the tokenizer with --tokenizer_from_generator (instead of a
--tokenizer file); a --tokenizer file that differs from it is refused unless --allow_other_tokenizer. The
generator's generation_config holds the paper's sampling (top-k 16000, top-p 0.9, temperature 1.0), the pipeline's
default; UCF-101 takes 95 steps, K600 2 context latent frames and 48 steps.
"""

import argparse
import logging
import os
import re
import shutil
import tempfile
import uuid

import torch

from ..pipelines.pipeline_nbp_video import create_hub_repo, upload_to_hub
from ..video_io import flush_to_disk
from .convert_nbp import generator_from_checkpoint
from .convert_tokenizer import differing_tensors, tokenizer_from_state_dict, tokenizer_state_dict_from_checkpoint
from .safe_load import safe_torch_load

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_SIZE = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*[KMGT]B\s*", re.IGNORECASE)  # what save_pretrained parses


def write_pipeline_folder(folder: str, transformer, video_tokenizer, max_shard_size, repo_id: str = None,
                          notes: str = None) -> None:
    """Save the converted components into `folder`: a full `NBPVideoPipeline` folder (model_index.json, the
    components' subfolders and code, a model card loading it from `repo_id` and saying `notes`) when both exist,
    else the one component in its subfolder of that layout."""
    if transformer is not None and video_tokenizer is not None:
        from ..pipelines import NBPVideoPipeline

        pipeline = NBPVideoPipeline(transformer=transformer, video_tokenizer=video_tokenizer)
        pipeline.save_pretrained(folder, max_shard_size=max_shard_size, repo_id=repo_id, model_card_notes=notes)
    elif transformer is not None:
        transformer.save_pretrained(os.path.join(folder, "transformer"), max_shard_size=max_shard_size)
    else:
        video_tokenizer.save_pretrained(os.path.join(folder, "video_tokenizer"), max_shard_size=max_shard_size)


def _check_output(output: str, inputs: list, overwrite: bool) -> None:
    """Refuse an existing `output` that is not a folder, holds one of the `inputs` (symlinks resolved) or, without
    `overwrite`, exists at all: replacing it would delete it. Also refuse an `output` that cannot be written, below a
    file or a folder without write access (checked before the slow conversion, which writes only at the end)."""
    parent = os.path.dirname(output)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"output {output} cannot be made: {parent} is a file, not a folder (--output)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output {output} cannot be made: {parent} is not writable (--output)")
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise ValueError(f"output {output} exists and is not a folder; give a folder path as output (--output)")
    folder = os.path.realpath(output)
    for path in inputs:
        if os.path.commonpath([folder, os.path.realpath(path)]) == folder:
            raise ValueError(f"output folder {output} holds the input checkpoint {path}, which replacing the folder "
                             "would delete; give another output folder (--output)")
    if not overwrite:
        raise ValueError(f"output folder {output} already exists; pass overwrite=True (--overwrite) to replace it")


def _replace_dir(source: str, target: str) -> None:
    """Move the finished folder `source` to `target`, its contents on disk before the move; an existing `target` is
    removed only once the move is on disk."""
    flush_to_disk(source)
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.replace(target, os.path.join(old, "folder"))
    os.replace(source, target)
    flush_to_disk(os.path.dirname(target), entries_only=True)
    if old is not None:
        shutil.rmtree(old)


def convert_checkpoints(output, generator=None, tokenizer=None, dtype: str = "float32", max_shard_size="5GB",
                        push_to_hub: str | None = None, private: bool = False, overwrite: bool = False,
                        tokenizer_config: dict | None = None, num_context_frames: int | None = None,
                        tokenizer_from_generator: bool = False, allow_other_tokenizer: bool = False) -> str:
    """Convert an official generator `*.ckpt` and/or tokenizer `*.pt` into the folder `output` (written under a
    temporary name, then renamed). `dtype`: one of `DTYPES`. `tokenizer_config`: `NBPVideoTokenizer` keyword
    arguments for non-official architectures. `num_context_frames`: context latent frames for unconditional
    (frame prediction) generators (None: the official 2; an error for the others). `tokenizer_from_generator`:
    convert the generator checkpoint's embedded tokenizer copy (`first_stage_model.*`) instead of a tokenizer file.
    A tokenizer file that differs from that copy (the tokenizer the generator was trained with) is refused unless
    `allow_other_tokenizer`. Returns the folder path."""
    if generator is None and tokenizer is None:
        raise ValueError("give a generator checkpoint (generator=...), a tokenizer file (tokenizer=...) or both")
    if tokenizer_from_generator and (generator is None or tokenizer is not None):
        raise ValueError("tokenizer_from_generator needs a generator checkpoint and no tokenizer file")
    if num_context_frames is not None and generator is None:
        raise ValueError("num_context_frames (--num_context_frames) needs a generator checkpoint")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not (isinstance(max_shard_size, int) and max_shard_size > 0
            or isinstance(max_shard_size, str) and SHARD_SIZE.fullmatch(max_shard_size)):
        raise ValueError(f"max_shard_size (--max_shard_size) must be a size in KB, MB, GB or TB such as '5GB', or a "
                         f"positive number of bytes; got {max_shard_size!r}")
    given_output, output = os.fspath(output), os.path.abspath(os.fspath(output))
    _check_output(output, [f for f in (generator, tokenizer) if f is not None], overwrite)
    torch_dtype = DTYPES[dtype]

    transformer, tokenizer_tensors, embedded = None, {}, {}
    if generator is not None:
        transformer, embedded = generator_from_checkpoint(safe_torch_load(generator), torch_dtype, num_context_frames)
        if tokenizer_from_generator and not embedded:
            raise ValueError(f"{generator} embeds no tokenizer (no first_stage_model.* tensors); give a tokenizer file")
        if tokenizer_from_generator:
            tokenizer_tensors = embedded
        elif embedded and tokenizer is None:
            logger.warning("skipped the %d first_stage_model.* tensors (the embedded tokenizer copy) of %s; "
                           "use tokenizer_from_generator=True to convert them", len(embedded), generator)
    if tokenizer is not None:
        tokenizer_tensors = tokenizer_state_dict_from_checkpoint(safe_torch_load(tokenizer))
        # both tokenizers have one architecture: a K600 generator paired with the UCF file would convert silently
        differ = differing_tensors(embedded, tokenizer_tensors) if embedded and not allow_other_tokenizer else []
        if differ:
            raise ValueError(
                f"{tokenizer} is not the tokenizer that {generator} was trained with: {len(differ)} of the "
                f"{len(embedded)} tensors of its embedded copy (first_stage_model.*) differ, e.g. {differ[:3]}. Give "
                "the matching tokenizer file (magvit2_ucf.pt for UCF-101 generators, magvit2_k600.pt for Kinetics-600 "
                "ones), or convert the embedded copy (tokenizer_from_generator=True, --tokenizer_from_generator), or "
                "pair them on purpose with allow_other_tokenizer=True (--allow_other_tokenizer)")
    video_tokenizer = (tokenizer_from_state_dict(tokenizer_tensors, tokenizer_config, torch_dtype)
                       if tokenizer is not None or tokenizer_from_generator else None)

    repo_id = create_hub_repo(push_to_hub, private) if push_to_hub else None  # the full id, for the model card
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staging = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.tmp-{uuid.uuid4().hex}")
    os.mkdir(staging)  # not mkdtemp: the folder gets a plain mkdir's permissions (the umask's), not 0700
    try:
        sources = " and ".join(f"`{os.path.basename(str(f))}`" for f in (generator, tokenizer) if f is not None)
        notes = (f"Converted with nbp-video's `nbp convert` from the official checkpoint{'s' * (' and ' in sources)} "
                 f"{sources} (github.com/RenShuhuai-Andy/NBP): every tensor mapped, none approximated; weights in "
                 f"{dtype}. The default sampling is the paper's (top-k 16000, top-p 0.9, temperature 1.0).")
        write_pipeline_folder(staging, transformer, video_tokenizer, max_shard_size, repo_id or given_output, notes)
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if repo_id:
        upload_to_hub(output, repo_id, commit_message="Convert official NBP checkpoints")
    return output


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="nbp convert", description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", help="official generator checkpoint (PyTorch Lightning *.ckpt)")
    parser.add_argument("--tokenizer", help="official tokenizer file (magvit2_{ucf,k600}.pt)")
    parser.add_argument("--output", required=True, help="folder to write (safetensors)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default float32)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest weight file (default 5GB: the 3B is sharded)")
    parser.add_argument("--num_context_frames", type=int,
                        help="context latent frames of unconditional (K600 frame prediction) models (default 2); "
                             "an error for class-conditional ones")
    parser.add_argument("--tokenizer_from_generator", action="store_true",
                        help="convert the tokenizer copy embedded in the generator checkpoint (first_stage_model.*)")
    parser.add_argument("--allow_other_tokenizer", action="store_true",
                        help="accept a --tokenizer file that differs from the tokenizer copy embedded in the generator "
                             "checkpoint (the one it was trained with)")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generator is None and args.tokenizer is None:
        parser.error("give --generator, --tokenizer or both")
    try:
        folder = convert_checkpoints(args.output, args.generator, args.tokenizer, args.dtype, args.max_shard_size,
                                     args.push_to_hub, args.private, args.overwrite,
                                     num_context_frames=args.num_context_frames,
                                     tokenizer_from_generator=args.tokenizer_from_generator,
                                     allow_other_tokenizer=args.allow_other_tokenizer)
    except (ValueError, FileNotFoundError) as error:  # bad input: a message, not a traceback
        parser.exit(2, f"nbp convert: error: {error}\n")
    parts = sorted(p for p in os.listdir(folder) if not p.startswith("."))
    print(f"wrote {folder} ({', '.join(parts)})" + (f"; pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0
