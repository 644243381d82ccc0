"""A byte-level tokenizer that needs no files: torchtune's ``ModelTokenizer`` protocol over UTF-8 bytes.

torchtune 0.6.1 ships no tiny offline tokenizer asset, so tests, the tiny configs and CPU smoke runs use
this one: ids 0-255 are the bytes, then BOS, EOS and PAD. Real runs use the model's own tokenizer.
"""

from __future__ import annotations

from typing import Any

from torchtune.data import Message
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import BaseTokenizer, ModelTokenizer


class ByteTokenizer(ModelTokenizer, BaseTokenizer, Transform):
    """UTF-8 bytes as token ids, plus three special tokens.

    Args:
        max_seq_len (int | None): sequences are truncated to this many tokens (EOS kept when added).
            Default: None

    Attributes:
        bos_id (int): 256. eos_id (int): 257. pad_id (int): 258. vocab_size (int): 259.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def __init__(self, max_seq_len: int | None = None):
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 or None, got max_seq_len={max_seq_len!r}")
        self.max_seq_len = max_seq_len

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, **kwargs: Any) -> list[int]:
        """Text -> ids: optional BOS, the UTF-8 bytes, optional EOS."""
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Ids -> text; special ids are dropped (or shown as ``<bos>``/``<eos>``/``<pad>``)."""
        out = bytearray()
        names = {self.bos_id: b"<bos>", self.eos_id: b"<eos>", self.pad_id: b"<pad>"}
        for t in token_ids:
            t = int(t)
            if t < 256:
                out.append(t)
            elif not skip_special_tokens and t in names:
                out.extend(names[t])
        return out.decode("utf-8", errors="replace")

    def tokenize_messages(self, messages: list[Message], **kwargs: Any) -> tuple[list[int], list[bool]]:
        """Messages -> (ids, mask): BOS, each message's text, EOS; ``mask`` is True where not trained on."""
        tokens, mask = [self.bos_id], [True]
        for message in messages:
            ids = self.encode(message.text_content, add_bos=False, add_eos=False)
            tokens.extend(ids)
            mask.extend([message.masked] * len(ids))
        tokens.append(self.eos_id)
        mask.append(mask[-1] if len(mask) > 1 else True)
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            tokens, mask = tokens[: self.max_seq_len - 1] + [self.eos_id], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: dict[str, Any], inference: bool = False) -> dict[str, Any]:
        tokens, mask = self.tokenize_messages(sample["messages"])
        sample["tokens"], sample["mask"] = tokens, mask
        return sample


def byte_tokenizer(max_seq_len: int | None = None) -> ByteTokenizer:
    """Builder for configs: ``tokenizer: {_component_: tad_torchtune.data.byte_tokenizer, max_seq_len: 64}``."""
    return ByteTokenizer(max_seq_len=max_seq_len)
