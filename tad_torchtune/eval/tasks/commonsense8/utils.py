"""Data loader for the StoryCloze task (lm-eval ``custom_dataset``; receives the task metadata as kwargs)."""

from __future__ import annotations

import os
from pathlib import Path


def load_storycloze(storycloze_dir: str | None = None, **kwargs):
    """Load the ROCStories StoryCloze CSVs from ``storycloze_dir`` (or ``$TAD_STORYCLOZE_DIR``) as a DatasetDict."""
    import datasets

    folder = storycloze_dir or os.environ.get("TAD_STORYCLOZE_DIR")
    if not folder:
        raise ValueError(
            "storycloze_2016_tad needs the StoryCloze CSV folder: set `storycloze_dir: /path` in the eval config "
            "(TaskManager metadata) or the environment variable TAD_STORYCLOZE_DIR"
        )
    csvs = sorted(Path(folder).expanduser().glob("*.csv"))
    val = [str(p) for p in csvs if "val" in p.name.lower()]
    test = [str(p) for p in csvs if "val" not in p.name.lower()]
    if not val or not test:
        raise FileNotFoundError(
            f"{folder}: expected a validation CSV (name containing 'val') and a test CSV, "
            f"found {[p.name for p in csvs]}"
        )
    return datasets.load_dataset("csv", data_files={"validation": val, "test": test})
