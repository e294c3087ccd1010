"""Official NBP video tokenizers (`magvit2_{ucf,k600}.pt`) -> `NBPVideoTokenizer`.

The official file is `{"model_state_dict": {...}}` (plus bookkeeping) saved from a DataParallel-wrapped
`VideoTokenizer` (`nbp/magvit2.py`, loaded by `nbp/download.py: load_magvit2`, which strips `module.` and loads
strictly). `NBPVideoTokenizer` keeps the official module tree (`encoder_layers.{0..26}`, `decoder_layers.{0..29}`,
FSQ without parameters), so its keys are the official keys without `module.`: 434 tensors, mapped one to one.
The same tensors sit under `first_stage_model.` in generator checkpoints that embed their frozen tokenizer.
"""

import torch
from accelerate import init_empty_weights

from ..video_tokenizer import NBPVideoTokenizer
from .safe_load import check_tensor_dict, load_exact_state_dict, strip_prefix

TOKENIZER_STATE_KEY = "model_state_dict"


def tokenizer_state_dict_from_checkpoint(checkpoint: dict) -> dict:
    """The tensors of a loaded official tokenizer file, without the `module.` prefix."""
    if not isinstance(checkpoint, dict) or TOKENIZER_STATE_KEY not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"not an official NBP tokenizer file: expected a dict with {TOKENIZER_STATE_KEY!r}, "
                         f"got {found}")
    tensors = check_tensor_dict(checkpoint[TOKENIZER_STATE_KEY], f"the tokenizer file's {TOKENIZER_STATE_KEY!r}")
    return strip_prefix(tensors, "module.")


def differing_tensors(embedded: dict, state_dict: dict) -> list[str]:
    """Keys of a generator checkpoint's embedded tokenizer copy (no prefix) that a tokenizer file's tensors do not
    reproduce: missing there, another shape, or other values once rounded to the copy's dtype (a generator trained in
    bfloat16 keeps its frozen copy in bfloat16). Keys the copy lacks are not compared."""
    return [k for k, v in embedded.items()
            if k not in state_dict or state_dict[k].shape != v.shape or not torch.equal(state_dict[k].to(v.dtype), v)]


def tokenizer_from_state_dict(state_dict: dict, config: dict | None = None,
                              dtype: torch.dtype = torch.float32) -> NBPVideoTokenizer:
    """Official tokenizer tensors (no prefix) -> `NBPVideoTokenizer` in eval mode. `config`: keyword arguments of
    `NBPVideoTokenizer` (default: the official architecture). Fails on any missing, unused or misshapen tensor."""
    with init_empty_weights(include_buffers=False):  # parameters on meta; FSQ's index buffers stay real
        tokenizer = NBPVideoTokenizer(**(config or {}))
    load_exact_state_dict(tokenizer, state_dict, "tokenizer checkpoint", dtype=dtype)
    return tokenizer.eval()
