"""Video data: clip loading, dataset layouts (folder, UCF-101, Kinetics-600), the moving-digits demo
dataset and pre-tokenization."""

from .clips import clip_frame_indices, frames_to_tensor, load_clip, load_clip_windows, resize_center_crop, window_starts
from .moving_digits import (DIGIT_CLASS_NAMES, DIGIT_TEXTS, MovingDigits, moving_digits_dataset,
                            write_moving_digits_folder)
from .pretokenize import TokenDataset, load_token_dataset, merge_token_chunks, pretokenize
from .video_datasets import (SkipSummary, VideoClipDataset, build_video_index, class_name_to_text,
                             collate_videos, detect_layout, item_seed, load_video_dataset,
                             streaming_video_dataset)

__all__ = [
    "clip_frame_indices", "frames_to_tensor", "load_clip", "load_clip_windows", "resize_center_crop", "window_starts",
    "DIGIT_CLASS_NAMES", "DIGIT_TEXTS", "MovingDigits", "moving_digits_dataset", "write_moving_digits_folder",
    "TokenDataset", "load_token_dataset", "merge_token_chunks", "pretokenize",
    "SkipSummary", "VideoClipDataset", "build_video_index", "class_name_to_text", "collate_videos",
    "detect_layout", "item_seed", "load_video_dataset", "streaming_video_dataset",
]
