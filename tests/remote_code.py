"""Running a script in a fresh interpreter where nbp-video cannot be imported (remote-code tests)."""

import os
import subprocess
import sys
import textwrap

_BLOCK_PACKAGE = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_nbp":
            raise ImportError("nbp-video is not installed here")
sys.meta_path.insert(0, Block())
"""


def run_without_package(script: str, modules_cache) -> str:
    """Run `script` with `import modeling_nbp` blocked, offline, with its own HF modules cache; -> its stdout."""
    env = dict(os.environ, HF_MODULES_CACHE=str(modules_cache), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", _BLOCK_PACKAGE + textwrap.dedent(script)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
