"""nbp-video: Next-Block Prediction video generation, native to transformers and diffusers.

- `NBPVideoPipeline`: the diffusers pipeline (class-conditional generation, frame prediction, longer videos,
  `stream()`); `modeling_nbp.demo.DEMO_MODEL` is the bundled moving-digits pipeline folder.
- `NBPForVideoGeneration` / `NBPConfig` (`NBPConfig.from_preset("k600-700m")`): the transformers generator, also
  under `AutoConfig` / `AutoModel` (model_type "nbp") once this package is imported.
- `NBPVideoTokenizer`: the diffusers video tokenizer (causal 3D CNN + FSQ).
- `BlockLayout`: where each token of a sequence sits; `PAPER_SAMPLING`: the paper's sampling values.

Submodules: `video_io` (read_video, export_to_mp4, export_to_gif), `data` (datasets, pre-tokenization),
`evaluation` (FVD, PSNR, SSIM), `training`, `conversion` (official checkpoints), `text_condition`. The command
line is `nbp` (`nbp --help`).
"""

from importlib.metadata import PackageNotFoundError, version

from transformers import AutoConfig, AutoModel

from .configuration_nbp import NBPConfig
from .layout import BlockLayout
from .modeling_nbp import NBPForVideoGeneration, NBPModel
from .video_tokenizer import NBPVideoTokenizer
from .generation import PAPER_SAMPLING
from .pipelines.pipeline_nbp_video import NBPVideoPipeline, NBPVideoPipelineOutput, NBPVideoStreamChunk

try:
    __version__ = version("nbp-video")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "unknown"

AutoConfig.register("nbp", NBPConfig, exist_ok=True)
AutoModel.register(NBPConfig, NBPForVideoGeneration, exist_ok=True)
# saved folders carry the modeling code, so `AutoModel.from_pretrained(path, trust_remote_code=True)` works
# on a machine without this package
NBPConfig.register_for_auto_class()
NBPForVideoGeneration.register_for_auto_class("AutoModel")
del AutoConfig, AutoModel, PackageNotFoundError, version  # transformers' and importlib's, not this package's API

__all__ = ["BlockLayout", "NBPConfig", "NBPForVideoGeneration", "NBPModel", "NBPVideoPipeline",
           "NBPVideoPipelineOutput", "NBPVideoStreamChunk", "NBPVideoTokenizer", "PAPER_SAMPLING"]
