from .pipeline_nbp_video import NBPVideoPipeline, NBPVideoPipelineOutput, NBPVideoStreamChunk

__all__ = ["NBPVideoPipeline", "NBPVideoPipelineOutput", "NBPVideoStreamChunk"]
