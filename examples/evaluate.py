"""FVD between a folder of generated videos and a folder of real ones (StyleGAN-V protocol: I3D logits of the first
16 frames at 224x224), or the dataset clips the videos were paired with; repeats on random subsets;
--reconstruction adds PSNR/SSIM of paired videos.

    python examples/generate.py --model nbp-ucf-700m --dataset /data/UCF-101 --num_clips 10000 --formats npy \
        --output_dir fake
    python examples/evaluate.py fake/ /data/UCF-101/ --real-dataset        # the clips of generate.json
    python examples/evaluate.py fake/ real_clips/ --num-samples 2048 --num-repeats 4   # two folders of one resolution

docs/evaluation.md has the paper's protocol.

Run with --help for every option; the code is modeling_nbp/evaluation/fvd.py (`nbp evaluate` runs the same).
"""

from modeling_nbp.evaluation.fvd import main

if __name__ == "__main__":
    main()
