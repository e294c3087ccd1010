"""Files a resumable run keeps beside its outputs: JSON written atomically, and the run's settings checked against
those of the run that started the folder (resuming with other settings would mix two runs' outputs)."""

import json
import os

from .video_io import atomic_output_path


def write_json(path: str | os.PathLike, content, indent: int | None = None) -> None:
    with atomic_output_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=indent)


def settings_differences(found: dict, wanted: dict, earlier_defaults: dict | None = None, prefix: str = "") -> list[str]:
    """'key old on disk, new now' for every (nested) key whose value differs. `earlier_defaults` (nested like the
    settings) gives the value of a key that `wanted` has and settings written before that key existed lack."""
    earlier_defaults = earlier_defaults or {}
    lines = []
    for key in sorted(set(found) | set(wanted)):
        old, new = found.get(key, earlier_defaults.get(key) if key in wanted else None), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += settings_differences(old, new, earlier_defaults.get(key), f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key} {old!r} on disk, {new!r} now")
    return lines


def read_settings_differences(path: str | os.PathLike, wanted: dict, earlier_defaults: dict | None = None
                              ) -> list[str] | None:
    """The differences between the settings file at `path` and `wanted` (see `settings_differences`); None when
    there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        found = json.load(f)
    return settings_differences(found, json.loads(json.dumps(wanted)), earlier_defaults)  # tuples read as lists
