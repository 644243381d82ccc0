"""The embedded demo: ``tad-tune demo`` distils SmolLM2-135M-Instruct on a CPU, offline (``docs/demo.md``).

Modules: :mod:`~tad_torchtune.demo.smollm2` (GGUF -> torchtune model, cached), :mod:`~tad_torchtune.demo.tokenizer`
(the tokenizer rebuilt from GGUF metadata), :mod:`~tad_torchtune.demo.text` (the text: CPython's reference
documentation), :mod:`~tad_torchtune.demo.run` (the three recipe runs, the table and the plot).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``tad-tune demo``: see ``tad-tune demo --help``."""
    from tad_torchtune.demo.run import main as _main

    return _main(argv)


__all__ = ["main"]
