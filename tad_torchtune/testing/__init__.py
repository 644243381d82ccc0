"""Helpers for tests and examples that need no downloads: tiny random teacher/student checkpoints, a text corpus
and the tiny config's assets (:mod:`.tiny`; ``python -m tad_torchtune.testing.tiny ROOT``)."""
