"""Shared by the training-script tests."""

import json
import os

import pytest
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; forget the previous one's shared state."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def read_log(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "train_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
