"""Conversion of the official NBP checkpoints (github.com/RenShuhuai-Andy/NBP) into this package's formats."""

from .cli import convert_checkpoints, main
from .convert_nbp import config_from_checkpoint, generator_from_checkpoint
from .convert_tokenizer import tokenizer_from_state_dict, tokenizer_state_dict_from_checkpoint
from .safe_load import safe_torch_load

__all__ = [
    "config_from_checkpoint",
    "convert_checkpoints",
    "generator_from_checkpoint",
    "main",
    "safe_torch_load",
    "tokenizer_from_state_dict",
    "tokenizer_state_dict_from_checkpoint",
]
