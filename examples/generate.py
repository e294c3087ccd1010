"""Generate videos with a pipeline folder or Hub repo: an MP4/GIF per video and a contact sheet.

    python examples/generate.py --model modeling_nbp/pretrained/nbp-moving-digits --class_labels 3 7 \
        --num_videos_per_class 2 --output_dir outputs/digits
    python examples/generate.py --model nbp-ucf-700m --class_labels ApplyEyeMakeup --guidance_scale 3    # converted
    python examples/generate.py --model nbp-k600-3b --context clip.mp4 --batch_size 16                   # frame prediction

Run with --help for every option; the code is modeling_nbp/cli.py (`nbp generate` runs the same). From Python, see
the README (`NBPVideoPipeline`).
"""

import sys

from modeling_nbp.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
