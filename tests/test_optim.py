import math

import pytest
import torch
from torch import nn

from modeling_nbp import NBPConfig, NBPForVideoGeneration
from modeling_nbp.training.optim import (OPTIMIZER_RECIPES, build_lr_scheduler, build_optimizer, build_param_groups,
                                         lr_at_step)


def tiny_model():
    torch.manual_seed(0)
    config = NBPConfig(latent_shape=[2, 4, 4], block_shape=[1, 1, 4], video_vocab_size=16, num_classes=3,
                       first_block="hybrid", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    return NBPForVideoGeneration(config)


# ---- parameter groups ------------------------------------------------------------------------------------------
def test_weight_decay_only_on_linear_weights():
    model = tiny_model()
    decay, no_decay = build_param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(decay["names"]) == linear_weights
    assert "lm_head.weight" in decay["names"] and "model.layers.0.self_attn.q_proj.weight" in decay["names"]
    for name in ("model.embed_tokens.weight", "model.embed_positions.weight", "model.uncond_embedding",
                 "model.norm.weight", "model.norm.bias", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.fc2.bias"):
        assert name in no_decay["names"], name
    # every trainable parameter exactly once, and the names match the tensors
    all_names = decay["names"] + no_decay["names"]
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())
    params = dict(model.named_parameters())
    for group in (decay, no_decay):
        assert all(p is params[n] for n, p in zip(group["names"], group["params"]))


def test_frozen_parameters_are_left_out_and_conv_weights_not_decayed():
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    decay, no_decay = build_param_groups(model, 0.1)
    assert decay["names"] == ["3.weight"]
    assert sorted(no_decay["names"]) == ["0.bias", "0.weight", "1.bias", "3.bias"]


def test_build_optimizer_uses_recipe_betas_and_rejects_bad_values():
    model = tiny_model()
    for recipe, betas in (("official", (0.9, 0.95)), ("paper", (0.9, 0.98))):
        assert OPTIMIZER_RECIPES[recipe]["betas"] == betas
        opt = build_optimizer(model, 1e-3, 0.01, OPTIMIZER_RECIPES[recipe]["betas"])
        assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == betas
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert OPTIMIZER_RECIPES["official"]["schedule"] == "cosine" and OPTIMIZER_RECIPES["paper"]["schedule"] == "linear"
    with pytest.raises(ValueError, match="weight_decay"):
        build_param_groups(model, -0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        build_optimizer(model, 0.0)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(model, 1e-3, betas=(0.9, 1.0))


# ---- schedules (values computed by hand) ---------------------------------------------------------------------------
BASE, TOTAL, WARMUP, LR_MIN = 1e-3, 100, 10, 1e-5


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),                 # warmup starts at warmup_lr_init
    (5, 5e-4),                # half way up
    # first step after the warmup: timm's cosine is measured from step 0 -> a little below the peak
    (10, 1e-5 + 0.5 * 0.99e-3 * (1 + math.cos(math.pi * 0.1))),
    (50, 1e-5 + 0.5 * 0.99e-3),  # cos(pi/2) = 0
    (100, 1e-5), (150, 1e-5),    # at and after the end: lr_min
])
def test_cosine_schedule(step, expected):
    assert lr_at_step(step, BASE, TOTAL, WARMUP, "cosine", LR_MIN) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (5, 5e-4), (10, 1e-3), (55, 1e-5 + 0.99e-3 * 45 / 90),
                                            (100, 1e-5), (120, 1e-5)])
def test_linear_schedule(step, expected):
    assert lr_at_step(step, BASE, TOTAL, WARMUP, "linear", LR_MIN) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_from_nonzero_start_and_constant_schedule():
    assert lr_at_step(0, BASE, TOTAL, 4, "constant", warmup_lr_init=2e-4) == pytest.approx(2e-4)
    assert lr_at_step(2, BASE, TOTAL, 4, "constant", warmup_lr_init=2e-4) == pytest.approx(6e-4)
    assert lr_at_step(4, BASE, TOTAL, 4, "constant") == BASE == lr_at_step(500, BASE, TOTAL, 4, "constant")


def test_scheduler_drives_the_optimizer_and_resumes_from_its_state():
    model = tiny_model()
    opt = build_optimizer(model, BASE)
    sched = build_lr_scheduler(opt, TOTAL, WARMUP, "cosine", LR_MIN)
    seen = []
    for _ in range(30):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, lrs in enumerate(seen):  # step i's update uses lr_at_step(i) in every group
        assert lrs == pytest.approx([lr_at_step(step, BASE, TOTAL, WARMUP, "cosine", LR_MIN)] * 2, rel=1e-12, abs=1e-15)
    resumed_opt = build_optimizer(tiny_model(), BASE)
    resumed = build_lr_scheduler(resumed_opt, TOTAL, WARMUP, "cosine", LR_MIN)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed.load_state_dict(sched.state_dict())
    for _ in range(5):
        opt.step(), sched.step(), resumed_opt.step(), resumed.step()
        assert [g["lr"] for g in resumed_opt.param_groups] == [g["lr"] for g in opt.param_groups]


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match="schedule"):
        lr_at_step(0, BASE, TOTAL, WARMUP, "exponential")
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at_step(0, BASE, 10, 20)
    with pytest.raises(ValueError, match="total_steps"):
        build_lr_scheduler(build_optimizer(tiny_model(), BASE), 0)
