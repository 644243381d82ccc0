"""Everything a step checkpoint is: writing and finding them, their manifests, and loading without running code.

- :mod:`.steps`: atomic, resumable step checkpoints (model, optimizer, scheduler, data position, RNG), pruning.
- :mod:`.manifest`: per-checkpoint ``manifest.json`` with file sizes and SHA-256 and the run's identity;
  verification on resume; stale partial checkpoints removed.
- :mod:`.safe_load`: ``weights_only`` / safetensors loading; pickles with payloads are refused.
- :mod:`.checks`: the start-up checks of ``tad-tune validate`` on checkpoints (the files the checkpointers name,
  the step checkpoint a run resumes).

The HF-format checkpointer of the models (``tad_torchtune.models.HFCheckpointer``) stays with the models whose
weights it converts. See ``docs/reliability.md``.
"""

from tad_torchtune.checkpoint.manifest import sha256_file, verify_manifest, write_manifest
from tad_torchtune.checkpoint.safe_load import UnsafeCheckpointError, safe_load
from tad_torchtune.checkpoint.steps import find_latest_checkpoint, load_step_checkpoint, save_step_checkpoint

__all__ = [
    "UnsafeCheckpointError",
    "find_latest_checkpoint",
    "load_step_checkpoint",
    "safe_load",
    "save_step_checkpoint",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]
