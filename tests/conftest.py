import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton decode kernels run under Triton's interpreter on CPU; it is chosen when triton is first imported
    # (torch.compile imports it too), so here, before any test
    os.environ.setdefault("TRITON_INTERPRET", "1")


# tests/ has no __init__.py: make its helper modules (e.g. `hub_server`) importable from the test files.
sys.path.insert(0, str(Path(__file__).resolve().parent))

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton  # noqa: F401
    except ImportError:
        pass  # the Triton tests skip themselves
    else:
        from triton_interpreter import interpret_bfloat16_as_a_gpu

        interpret_bfloat16_as_a_gpu()

from hub_server import LocalHubServer, forget_hub_clients, use_local_hub  # noqa: E402


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A running `LocalHubServer` (Hub API test double on 127.0.0.1), with the Hub client pointed at it.

    The client's environment and `huggingface_hub.constants` are patched for this test only (see `use_local_hub`):
    endpoint, dummy token, telemetry and Xet off, online mode, and an empty cache under `tmp_path / "hf_home"`.
    """
    server = LocalHubServer().start()
    try:
        use_local_hub(monkeypatch, server.endpoint, tmp_path / "hf_home")
        yield server
    finally:
        server.stop()
        forget_hub_clients()
