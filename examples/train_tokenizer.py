"""Train an NBP video tokenizer (causal 3D CNN + FSQ) with Accelerate (any `accelerate launch` configuration).

    accelerate launch examples/train_tokenizer.py --dataset moving_digits --num_clips 2000 --output_dir runs/tok

Run with --help for every option; the code is modeling_nbp/training/train_tokenizer.py (`nbp train-tokenizer`
runs the same).
"""

from modeling_nbp.training.train_tokenizer import main

if __name__ == "__main__":
    main()
