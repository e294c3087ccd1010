from .pipeline_nbp_video import PAPER_SAMPLING, NBPVideoPipeline, NBPVideoPipelineOutput, NBPVideoStreamChunk

__all__ = ["PAPER_SAMPLING", "NBPVideoPipeline", "NBPVideoPipelineOutput", "NBPVideoStreamChunk"]
