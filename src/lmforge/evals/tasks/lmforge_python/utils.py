"""Loads the task's JSONL from this folder, so the task needs no download and no working-directory convention.

lm-eval calls `load(**metadata, **dataset_kwargs)` for a task's `custom_dataset`; `data_files` maps split names
to file names relative to this folder.
"""

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_: Any) -> datasets.DatasetDict:
    """The splits named in `data_files`, read from this folder (lm-eval's metadata arguments are not used)."""
    splits = {}
    for split, name in data_files.items():
        with open(HERE / name, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    return datasets.DatasetDict(splits)
