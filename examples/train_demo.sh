#!/usr/bin/env bash
# Retrain the bundled demo model (modeling_nbp/pretrained/nbp-moving-digits) from scratch on 2 CPU cores with the
# project's own scripts. Wall times and final figures of the shipped run are in the README ("The demo model").
# Rerunning it after an interruption resumes it: finished data is kept, training continues from its last checkpoint.
set -euo pipefail
RUNS=${RUNS:-runs/demo}
DATA=(--size 32 --digit_size 16 --speed_range 1 2 --styles_per_class 2)   # = modeling_nbp.demo.DEMO_DATA

digits() {  # $1: the folder, then make-digits flags; the folder appears only once all its clips are written
  [ -d "$1" ] && return
  rm -rf "$1.partial"
  nbp make-digits --output_dir "$1.partial" "${@:2}" "${DATA[@]}"
  mv "$1.partial" "$1"
}

# 1. data: 5000 training clips (seed 0) and 200 held-out clips (seed 12345), as MP4 files in class folders
digits "$RUNS/digits_train" --clips_per_class 500 --seed 0
digits "$RUNS/digits_val" --clips_per_class 20 --seed 12345

# 2. video tokenizer: 17x32x32 -> 5x8x8 ids, FSQ [8,5,5,5] = 1000 codes (no GAN, no perceptual loss)
nbp train-tokenizer --train_data "$RUNS/digits_train" --validation_data "$RUNS/digits_val" \
  --num_frames 17 --resolution 32 --output_dir "$RUNS/tokenizer" --resume_from_checkpoint latest \
  --base_channels 16 --channel_multipliers 1,2,4 --layers_per_block 1 --time_strides 2,2 --space_strides 1,2 \
  --patch_size 2 --fsq_levels 8,5,5,5 --norm_num_groups 8 \
  --adversarial_weight 0 --disc_start_step 1000000 --learning_rate 1.5e-3 --max_steps 1500 --train_batch_size 4 \
  --logging_steps 50 --eval_steps 500 --checkpointing_steps 250 --checkpoints_total_limit 2 \
  --mixed_precision no --dataloader_num_workers 1 --seed 0

# 3. token grids of both sets, once
nbp pretokenize --data "$RUNS/digits_train" --tokenizer "$RUNS/tokenizer/final" --output_dir "$RUNS/tokens_train" \
  --num_frames 17 --resolution 32 --batch_size 32
nbp pretokenize --data "$RUNS/digits_val" --tokenizer "$RUNS/tokenizer/final" --output_dir "$RUNS/tokens_val" \
  --num_frames 17 --resolution 32 --batch_size 32

# 4. generator: 4 layers x 256, class token + hybrid start, row blocks of 8 tokens (47 steps), class dropout for CFG
nbp train --train_data "$RUNS/tokens_train/tokens" --validation_data "$RUNS/tokens_val/tokens" \
  --tokenizer "$RUNS/tokenizer/final" --output_dir "$RUNS/generator" --resume_from_checkpoint latest \
  --num_layers 4 --hidden_size 256 --num_heads 8 --block_shape 1,1,8 --first_block hybrid --condition_mode class \
  --class_dropout_prob 0.1 --dropout 0.0 --learning_rate 1e-3 --warmup_steps 50 --lr_min 1e-4 \
  --max_steps "${GEN_STEPS:-2400}" --train_batch_size 16 --checkpointing_steps 100 --checkpoints_total_limit 2 \
  --logging_steps 25 --mixed_precision no --dataloader_num_workers 1 --seed 0

# 5. ship it: the package's pipeline folder (generator in float16, tokenizer in float32), the position table cut to the
#    329 positions this layout uses, the demo's sampling as the model's generation_config
RUNS="$RUNS" python - <<'PY'
import os
import torch
from modeling_nbp import NBPConfig, NBPForVideoGeneration, NBPVideoPipeline
from modeling_nbp.demo import DEMO_MODEL, DEMO_SAMPLING
pipe = NBPVideoPipeline.from_pretrained(os.path.join(os.environ["RUNS"], "generator", "final"))
config = NBPConfig.from_dict({**pipe.transformer.config.to_dict(), "max_position_embeddings": pipe.transformer.layout.sequence_length})
state = pipe.transformer.state_dict()
state["model.embed_positions.weight"] = state["model.embed_positions.weight"][: config.max_position_embeddings]
model = NBPForVideoGeneration(config)
model.load_state_dict(state)
model.generation_config.update(do_sample=True, **DEMO_SAMPLING)  # the pipeline's default sampling
NBPVideoPipeline(transformer=model.eval().to(torch.float16), video_tokenizer=pipe.video_tokenizer).save_pretrained(
    DEMO_MODEL, carry_code=False,  # the package holds the code
    model_card_notes="Trained with nbp-video's examples/train_demo.sh on 2 CPU cores (procedural moving digits, "
                     "5000 training clips); the commands and measured results are in the project README.")
PY
