"""The package's top-level namespace: what `import modeling_nbp` offers, and the imports the README shows."""

import importlib
import importlib.metadata
import re
import types
from pathlib import Path

import modeling_nbp

README = Path(__file__).resolve().parents[1] / "README.md"


def test_namespace_is_all_and_submodules():
    public = {name for name, value in vars(modeling_nbp).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(modeling_nbp.__all__)  # transformers' AutoConfig/AutoModel are not re-exported
    star = {}
    exec("from modeling_nbp import *", star)
    assert set(star) - {"__builtins__"} == set(modeling_nbp.__all__)


def test_version_is_the_installed_distributions():
    assert modeling_nbp.__version__ == importlib.metadata.version("nbp-video")


def test_readme_imports_resolve():
    lines = re.findall(r"^\s*from (modeling_nbp[\w.]*) import ([\w, ]+)", README.read_text(encoding="utf-8"), re.M)
    assert lines
    for module, names in lines:
        imported = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(imported, name.strip()), f"README: from {module} import {name.strip()}"
