"""nbp-video: Next-Block Prediction video generation, native to transformers and diffusers."""

from transformers import AutoConfig, AutoModel

from .configuration_nbp import NBPConfig
from .layout import BlockLayout
from .modeling_nbp import NBPForVideoGeneration, NBPModel

AutoConfig.register("nbp", NBPConfig, exist_ok=True)
AutoModel.register(NBPConfig, NBPForVideoGeneration, exist_ok=True)

__all__ = ["BlockLayout", "NBPConfig", "NBPForVideoGeneration", "NBPModel"]
