"""Utilities: FLOP accounting and utilisation (``flops``)."""
