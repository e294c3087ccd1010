from ..generation import PAPER_SAMPLING
from .pipeline_nbp_video import NBPVideoPipeline, NBPVideoPipelineOutput, NBPVideoStreamChunk

__all__ = ["PAPER_SAMPLING", "NBPVideoPipeline", "NBPVideoPipelineOutput", "NBPVideoStreamChunk"]
