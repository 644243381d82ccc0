"""Reliability for long distillation runs: numerical guards, run identity, refusals, fault points.

Crash-safe checkpoints, their manifests and safe loading live in :mod:`tad_torchtune.checkpoint`.

- :mod:`.guards`: non-finite logits, loss and gradients caught per step (``nonfinite_policy: skip | stop``).
- :mod:`.run_identity`: one run per ``output_dir`` (lock), run id and config in every checkpoint, config drift
  on resume, a worker whose launcher died stops.
- :mod:`.errors`: a refused input ends any command with one message and a non-zero exit (``--debug``: traceback).
- :mod:`.fault`: named points where the crash tests' hooks (installed by the tests only) may kill the process.

Start-up config validation runs from :mod:`tad_torchtune.validate` (the ``output_dir`` check is
:func:`.run_identity.output_dir_problems`). See ``docs/reliability.md``.
"""

from tad_torchtune.reliability.guards import NonFiniteError, NonFiniteGuard

__all__ = ["NonFiniteError", "NonFiniteGuard"]
