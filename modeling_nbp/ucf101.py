"""The UCF-101 class table of the official models: class names and their 8 LLaMA-2 condition ids.

The table (modeling_nbp/assets/ucf101_classes.json) holds, for the 101 classes in the official label order
(sorted class folders), the lower-cased camel-case split text and the 8 ids that the official preprocessing
gets from the LLaMA-2 tokenizer (BOS first, right-padded with EOS). The official generator adds 16 to them
(BOV + 15 placeholders come first), so converting and running the official UCF models needs no LLaMA tokenizer.
"""

import json
import os

UCF101_TEXT_ID_OFFSET = 16


def load_ucf101_table() -> list[dict]:
    path = os.path.join(os.path.dirname(__file__), "assets", "ucf101_classes.json")
    if not os.path.isfile(path):  # a copy of this file carried as remote code, without the package's assets
        raise FileNotFoundError(f"the UCF-101 class table ({path}) ships with the nbp-video package: install it for "
                                "the UCF presets (saved UCF models hold their class ids and need no table)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["classes"]


def ucf101_class_condition_ids(offset: int = UCF101_TEXT_ID_OFFSET) -> list[list[int]]:
    """Each class's 8 text ids moved past the special tokens (16 in the official models)."""
    return [[i + offset for i in c["llama2_ids"]] for c in load_ucf101_table()]


def ucf101_id2label() -> dict[int, str]:
    return {c["label"]: c["name"] for c in load_ucf101_table()}
