"""Generate videos with a pipeline folder or Hub repo: an MP4/GIF per video and a contact sheet.

    python examples/generate.py --model modeling_nbp/pretrained/nbp-moving-digits --class_labels 3 7 \
        --num_videos_per_class 2 --output_dir outputs/digits
    python examples/generate.py --model nbp-ucf-700m --class_labels ApplyEyeMakeup --guidance_scale 3    # converted
    python examples/generate.py --model nbp-k600-3b --context clip.mp4 --batch_size 16                   # frame prediction

At evaluation scale (files are written batch by batch; rerunning a command resumes it; `accelerate launch` shares the
videos between processes without changing any of them), e.g. the paper's UCF-101 protocol: 10,000 videos, each with
the class of a training clip (docs/evaluation.md has it and the Kinetics-600 one, with the matching `nbp evaluate`):

    accelerate launch --multi_gpu --num_processes 8 examples/generate.py --model nbp-ucf-700m \
        --dataset /data/UCF-101 --num_clips 10000 --formats npy --batch_size 64 --output_dir fvd/ucf_0

Run with --help for every option; the code is modeling_nbp/generate_videos.py (`nbp generate` runs the same). From
Python, see the README (`NBPVideoPipeline`).
"""

import sys

from modeling_nbp.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
