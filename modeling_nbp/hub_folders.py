"""The local folder of a model that a command names: the model's own folder, a pipeline folder (the model's component
subfolder), a Hub repo id of either, of which only that component's files are downloaded, or "demo"."""

from __future__ import annotations

import json
import os

from .pipelines.pipeline_nbp_video import hub_snapshot

# the bundled moving-digits pipeline, which the commands call "demo"
DEMO_MODEL = os.path.join(os.path.dirname(__file__), "pretrained", "nbp-moving-digits")

# what a component's config.json holds (key: value), and the component in words
CONFIG_MARKS = {"transformer": ("model_type", "nbp", "an NBP generator"),
                "video_tokenizer": ("_class_name", "NBPVideoTokenizer", "an NBP video tokenizer")}
# weights of a variant ("model.fp16.safetensors", "model.fp16-00001-of-00002.safetensors"): a dot before the last
VARIANT_WEIGHTS = ["*.*.safetensors", "*.*.bin"]


def component_folder(source: str | os.PathLike, component: str, files: list[str], what: str,
                     revision: str | None = None) -> str:
    """The folder holding the model `source` names. `component`: its subfolder in a pipeline ("transformer",
    "video_tokenizer"); `files`: the patterns of its files in its own folder (what a Hub repo download fetches, also
    under `component/`, without other variants' weights); `what` names the model in errors; `revision`: the branch,
    tag or commit of a Hub repo (default: main). "demo" is `DEMO_MODEL` unless a model folder has that name (not, say,
    the output folder of `nbp demo --output_dir demo`). A folder that holds no such model (another model, or no
    config.json) raises OSError naming what it is."""
    folder = name = os.fspath(source)
    if folder == "demo" and not any(os.path.isfile(os.path.join(folder, f)) for f in ("model_index.json",
                                                                                    "config.json")):
        folder = name = DEMO_MODEL
    folder = hub_snapshot(folder, what, ["model_index.json", f"{component}/*", *files],
                          ignore_patterns=VARIANT_WEIGHTS, revision=revision) or folder
    part = os.path.join(folder, component)
    folder = part if os.path.isdir(part) else folder
    key, value, kind = CONFIG_MARKS[component]
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            held = json.load(f)
    except (OSError, ValueError):
        final = os.path.join(folder, "final")
        hint = f": a training run's model is in {final}" if os.path.isdir(final) else ""
        raise FileNotFoundError(f"{what} {name!r} is not {kind} or a pipeline holding one: it has no readable "
                                f"config.json or {component}/config.json{hint}") from None
    held = held if isinstance(held, dict) else {}
    if held.get(key) != value:
        holds = next((k for k2, v2, k in CONFIG_MARKS.values() if held.get(k2) == v2), "another model")
        raise OSError(f"{what} {name!r} is {holds}, not {kind} (its config.json has no {key}: {value!r})")
    return folder
