"""Free-text prompts for the official UCF-101 NBP model, which was trained on class names as LLaMA-2 token ids.

Official rules (nbp/data.py, nbp/lm_transformer.py): the class folder name is split on camel case and lower-cased
("ApplyEyeMakeup" -> "apply eye makeup"); the slow LLaMA-2 `LlamaTokenizer` with pad_token = eos encodes it with
BOS, right padding and truncation to exactly 8 ids; the generator shifts them by 16 (past BOV and the 15
placeholders). Note: the transformers 5 `LlamaTokenizer` pads on the LEFT by default, so the side is set here.

The shipped class table (modeling_nbp/assets/ucf101_classes.json) makes the tokenizer unnecessary for the 101
classes; `check_ucf_table` re-derives it from a tokenizer folder.
"""

import os
import re

import torch

from .ucf101 import UCF101_TEXT_ID_OFFSET, load_ucf101_table


def class_name_to_text(name: str) -> str:
    """Class folder name -> text: camel case split, underscores to spaces, lower case ("YoYo" -> "yo yo"); for the
    UCF-101 names, the official prompt text."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    return re.sub(r"([a-z])([A-Z])", r"\1 \2", name).replace("_", " ").lower()


def load_condition_tokenizer(tokenizer_path: str):
    """A tokenizer from a LOCAL folder only (never downloads): its tokenizer.json as saved (special tokens from its
    tokenizer_config.json; LLaMA's when it has none, as the official `llama_tokenizer/` folder, which holds only
    tokenizer.json and tokenizer.model), else AutoTokenizer, else `LlamaTokenizer` on tokenizer.model. pad_token is
    set to eos, as in the official code.

    Not the transformers 5 `LlamaTokenizer` on a tokenizer.json: it rebuilds the normalizer and so drops a leading
    space (" riding" -> "▁riding"), which the official slow tokenizer and LLaMA-2's tokenizer.json keep ("▁",
    "▁riding"). Still different from the slow tokenizer: text holding "<s>", "</s>" or "<unk>" (it puts "▁" around
    them)."""
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    if not isinstance(tokenizer_path, (str, os.PathLike)) or not os.path.isdir(tokenizer_path):
        raise ValueError(f"tokenizer_path must be a local tokenizer folder (nothing is downloaded), "
                         f"got {tokenizer_path!r}")
    has_config = os.path.isfile(os.path.join(tokenizer_path, "tokenizer_config.json"))
    if os.path.isfile(os.path.join(tokenizer_path, "tokenizer.json")):
        special = {} if has_config else dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path, local_files_only=True, **special)
    elif has_config:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    else:
        tokenizer = LlamaTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer in {tokenizer_path} has no eos token, which the official rules pad with")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_to_condition_ids(texts, tokenizer_path, num_tokens: int = 8,
                          offset: int = UCF101_TEXT_ID_OFFSET) -> torch.Tensor:
    """Prompts -> (B, num_tokens) condition ids for `generate_video_tokens(condition_ids=...)`: BOS + text ids,
    right-padded with eos and truncated to `num_tokens`, then shifted by `offset` (the generator's
    `condition_token_offset`, 16 for UCF-101). `tokenizer_path`: a local tokenizer folder (nothing is downloaded)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a string or a non-empty list of strings, got {texts!r}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    tokenizer = load_condition_tokenizer(tokenizer_path)
    encoded = tokenizer(list(texts), padding="max_length", max_length=num_tokens, truncation=True,
                        add_special_tokens=True, padding_side="right", return_tensors="pt")
    return encoded.input_ids.long() + offset


def check_ucf_table(tokenizer_path) -> list[str]:
    """Re-derive the shipped UCF-101 table (texts and LLaMA-2 ids) with the tokenizer in `tokenizer_path`;
    returns one line per mismatch (empty when the table is reproduced exactly)."""
    table = load_ucf101_table()
    problems = []
    for entry in table:
        if class_name_to_text(entry["name"]) != entry["text"]:
            problems.append(f"{entry['name']}: text {entry['text']!r} != {class_name_to_text(entry['name'])!r}")
    width = len(table[0]["llama2_ids"])
    ids = text_to_condition_ids([e["text"] for e in table], tokenizer_path, num_tokens=width, offset=0)
    for entry, row in zip(table, ids.tolist()):
        if row != entry["llama2_ids"]:
            problems.append(f"{entry['name']}: ids {entry['llama2_ids']} != tokenizer {row}")
    return problems
