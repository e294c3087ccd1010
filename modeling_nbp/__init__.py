"""nbp-video: Next-Block Prediction video generation, native to transformers and diffusers."""

from transformers import AutoConfig, AutoModel

from .configuration_nbp import NBPConfig
from .layout import BlockLayout
from .modeling_nbp import NBPForVideoGeneration, NBPModel
from .video_tokenizer import NBPVideoTokenizer
from .generation import PAPER_SAMPLING
from .pipelines.pipeline_nbp_video import NBPVideoPipeline, NBPVideoPipelineOutput, NBPVideoStreamChunk

AutoConfig.register("nbp", NBPConfig, exist_ok=True)
AutoModel.register(NBPConfig, NBPForVideoGeneration, exist_ok=True)
# saved folders carry the modeling code, so `AutoModel.from_pretrained(path, trust_remote_code=True)` works
# on a machine without this package
NBPConfig.register_for_auto_class()
NBPForVideoGeneration.register_for_auto_class("AutoModel")

__all__ = ["BlockLayout", "NBPConfig", "NBPForVideoGeneration", "NBPModel", "NBPVideoPipeline",
           "NBPVideoPipelineOutput", "NBPVideoStreamChunk", "NBPVideoTokenizer", "PAPER_SAMPLING"]
