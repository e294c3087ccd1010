"""Train an NBP generator on pre-tokenized video with Accelerate (any `accelerate launch` configuration).

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train_nbp.py \
        --train_data tokens/ucf_train --output_dir runs/ucf --preset ucf-700m --tokenizer pretrained/tokenizer

Run with --help for every option; the code is modeling_nbp/training/train_nbp.py (`nbp train` runs the same).
"""

from modeling_nbp.training.train_nbp import main

if __name__ == "__main__":
    main()
