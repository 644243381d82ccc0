"""Run the teacher once: an offline pass over a corpus, sharded and resumable, and its writers.

- :mod:`~tad_torchtune.offline.engine`: the pass (:func:`run_pass`), instance sources, the :class:`Writer`
  protocol, shard files and manifest, :func:`load_pass` / :func:`iter_shards` to read a finished pass.
- :mod:`~tad_torchtune.offline.miniplm`: MiniPLM's difference sampling (score, select, write a token file).
- :mod:`~tad_torchtune.offline.seqkd`: Seq-KD (teacher continuations; :func:`seqkd_dataset` for the recipe).

Commands: ``tad-tune offline score | select | generate`` (``docs/offline.md``).
"""

from tad_torchtune.offline.engine import (
    Batch,
    InstanceSource,
    OfflinePassMismatchError,
    PromptSource,
    WindowSource,
    Writer,
    iter_shards,
    load_pass,
    read_manifest,
    run_pass,
)
from tad_torchtune.offline.seqkd import SeqKDDataset, seqkd_dataset

__all__ = [
    "Batch",
    "InstanceSource",
    "OfflinePassMismatchError",
    "PromptSource",
    "SeqKDDataset",
    "WindowSource",
    "Writer",
    "iter_shards",
    "load_pass",
    "read_manifest",
    "run_pass",
    "seqkd_dataset",
]
