"""Reliability for long distillation runs (issue 9): crash-safe checkpoints, numerical guards, safe loading.

- :mod:`.manifest`: per-checkpoint ``manifest.json`` with file sizes and SHA-256; verification on resume.
- :mod:`.safe_load`: ``weights_only`` / safetensors loading; pickles with payloads are refused.
- :mod:`.guards`: non-finite logits, loss and gradients caught per step (``nonfinite_policy: skip | stop``).
- :mod:`.run_identity`: one run per ``output_dir`` (lock), run id and config in every checkpoint, config drift
  on resume, a worker whose launcher died stops.
- :mod:`.errors`: a refused input ends any command with one message and a non-zero exit (``--debug``: traceback).
- :mod:`.fault`: named points where the crash tests' hooks (installed by the tests only) may kill the process.

Start-up config validation lives in :mod:`tad_torchtune.validate`. See ``docs/reliability.md``.
"""

from tad_torchtune.reliability.guards import NonFiniteError, NonFiniteGuard
from tad_torchtune.reliability.manifest import sha256_file, verify_manifest, write_manifest
from tad_torchtune.reliability.safe_load import UnsafeCheckpointError, safe_load

__all__ = [
    "NonFiniteError",
    "NonFiniteGuard",
    "UnsafeCheckpointError",
    "safe_load",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]
