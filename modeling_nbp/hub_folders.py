"""The local folder of a model that a command names: the model's own folder, a pipeline folder (the model's component
subfolder), a Hub repo id of either, of which only that component's files are downloaded, or "demo"."""

from __future__ import annotations

import os

# the bundled moving-digits pipeline, which the commands call "demo"
DEMO_MODEL = os.path.join(os.path.dirname(__file__), "pretrained", "nbp-moving-digits")


def component_folder(source: str | os.PathLike, component: str, files: list[str], what: str) -> str:
    """The folder holding the model `source` names. `component`: its subfolder in a pipeline ("transformer",
    "video_tokenizer"); `files`: the patterns of its files in its own folder (what a Hub repo download fetches, also
    under `component/`); `what` names the model in errors. "demo" is `DEMO_MODEL` unless a model folder has that name
    (not, say, the output folder of `nbp demo --output_dir demo`)."""
    folder = os.fspath(source)
    if folder == "demo" and not any(os.path.isfile(os.path.join(folder, name)) for name in ("model_index.json",
                                                                                          "config.json")):
        folder = DEMO_MODEL
    if not os.path.isdir(folder):
        where = f"no folder at {os.path.abspath(os.path.expanduser(folder))}"
        if folder.startswith((".", "/", "~")) or folder.count("/") != 1 or os.path.exists(folder):
            raise FileNotFoundError(f"{what} {folder!r}: {where} (a Hub repo id has the form 'owner/name')")
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(folder, allow_patterns=["model_index.json", f"{component}/*", *files])
        except Exception as err:  # not on the Hub, offline, or not a valid repo id
            raise OSError(f"{what} {folder!r} is neither a local folder ({where}) nor a Hub repo that could be "
                          f"downloaded: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                          ) from err
    part = os.path.join(folder, component)
    return part if os.path.isdir(part) else folder
