"""Train an NBP video tokenizer (causal 3D CNN + FSQ) with Accelerate (any `accelerate launch` configuration).

    accelerate launch examples/train_tokenizer.py --train_data /data/UCF-101 --preset ucf --output_dir runs/tok
    accelerate launch examples/train_tokenizer.py --dataset moving_digits --num_clips 2000 --resolution 64 \
        --base_channels 32 --channel_multipliers 1,2,2 --layers_per_block 1 --time_strides 2,2 \
        --space_strides 2,2 --fsq_levels 8,5,5,5 --patch_size 2 --output_dir runs/tok_digits   # a small one

Without size flags the tokenizer has the official size (370M parameters).

Run with --help for every option; the code is modeling_nbp/training/train_tokenizer.py (`nbp train-tokenizer`
runs the same).
"""

from modeling_nbp.training.train_tokenizer import main

if __name__ == "__main__":
    main()
