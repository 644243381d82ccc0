"""A tiny self-contained tokenizer for data tests: one id per UTF-8 byte, after pad/BOS/EOS (and optional extras).

Not the package's :class:`tad_torchtune.training.ByteTokenizer` (bytes first, then BOS/EOS/PAD; no options): the
data tests need the knobs below (ids past 65535, a permuted or extended vocabulary, a changed fingerprint).
"""

from __future__ import annotations


class ByteTokenizer:
    """ids: 0 pad, 1 BOS, 2 EOS, then ``offset + byte``; ``extra_specials`` names ids after the bytes.

    ``offset`` lets a test push ids past 65535 (uint32 token files); ``permute`` swaps two byte ids to make a
    vocabulary that disagrees with the plain one.
    """

    def __init__(self, offset: int = 3, extra_specials: int = 0, permute: tuple[int, int] | None = None, upper=False):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.offset = offset
        self.upper = upper
        self._perm = list(range(256))
        if permute is not None:
            a, b = permute
            self._perm[a], self._perm[b] = self._perm[b], self._perm[a]
        self._inv = {v: k for k, v in enumerate(self._perm)}
        base = offset + 256
        self.special_tokens = {"<pad>": 0, "<s>": 1, "</s>": 2}
        self.special_tokens.update({f"<extra_{i}>": base + i for i in range(extra_specials)})
        self.vocab_size = base + extra_specials

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        if self.upper:
            text = text.upper()
        ids = [self.offset + self._perm[b] for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: list[int]) -> str:
        data = bytes(self._inv[i - self.offset] for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")
