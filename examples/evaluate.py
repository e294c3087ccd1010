"""FVD between a folder of generated videos and a folder of real ones (StyleGAN-V protocol: I3D logits of the first
16 frames at 224x224), with repeats on random subsets; --reconstruction adds PSNR/SSIM of paired videos.

    python examples/generate.py --model nbp-ucf-700m --num_videos_per_class 100 --formats mp4 --output_dir fake
    python examples/evaluate.py fake/ /data/UCF-101/ --num-samples 2048 --num-repeats 4

Run with --help for every option; the code is modeling_nbp/evaluation/fvd.py (`nbp evaluate` runs the same).
"""

from modeling_nbp.evaluation.fvd import main

if __name__ == "__main__":
    main()
