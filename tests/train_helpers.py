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


def tensorboard_steps(log_dir, tag: str) -> list[int]:
    """The steps of scalar `tag` as TensorBoard shows them: every event file under `log_dir` (one per run, the
    hparams subfolders aside) read in the order the runs wrote them."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = [os.path.join(log_dir, name) for name in os.listdir(log_dir) if "tfevents" in name]
    files.sort(key=lambda path: next(iter(EventFileLoader(path).Load())).wall_time)
    with tempfile.TemporaryDirectory() as ordered:
        for i, path in enumerate(files):  # TensorBoard reads a folder's files in name order
            os.symlink(os.path.abspath(path), os.path.join(ordered, f"events.out.tfevents.{i:04d}"))
        accumulator = EventAccumulator(ordered)
        accumulator.Reload()
        return [event.step for event in accumulator.Scalars(tag)]
