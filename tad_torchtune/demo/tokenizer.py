"""The SmolLM2 tokenizer rebuilt from GGUF metadata, as a torchtune ``ModelTokenizer``.

A GGUF file of a GPT-2-style model (``tokenizer.ggml.model == "gpt2"``) carries the whole byte-level BPE:
``tokenizer.ggml.tokens`` (the vocabulary in GPT-2's byte-to-unicode alphabet, ``Ġ`` for a space),
``tokenizer.ggml.merges`` (ranked ``"a b"`` pairs), ``tokenizer.ggml.token_type`` (3 = control/special)
and the special ids. ``tokenizer.ggml.pre == "smollm"`` names SmolLM's pre-tokenizer: every digit is its
own piece, then GPT-2's byte-level regex split. With those, the HF ``tokenizers`` package reproduces the
original ``tokenizer.json`` exactly, no hub access needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torchtune.data import Message

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _contents(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def build_hf_tokenizer(reader) -> tuple[Tokenizer, dict[str, Any]]:
    """A ``tokenizers.Tokenizer`` and the special ids from a :class:`gguf.GGUFReader`'s metadata.

    Raises:
        ValueError: for a GGUF tokenizer other than SmolLM's byte-level BPE (its pre-tokenizer differs).
    """
    model_kind = _contents(reader, "tokenizer.ggml.model")
    pre = _contents(reader, "tokenizer.ggml.pre", "default")
    if model_kind != "gpt2" or pre != "smollm":
        raise ValueError(
            f"only SmolLM's byte-level BPE is supported (tokenizer.ggml.model='gpt2', pre='smollm'); "
            f"got model={model_kind!r}, pre={pre!r}"
        )
    tokens: list[str] = _contents(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = _contents(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _contents(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, t in enumerate(token_types) if t in (_CONTROL, _USER_DEFINED)]
    tokenizer.add_special_tokens(special)
    ids = {
        "bos_id": int(_contents(reader, "tokenizer.ggml.bos_token_id")),
        "eos_id": int(_contents(reader, "tokenizer.ggml.eos_token_id")),
        "pad_id": int(
            _contents(reader, "tokenizer.ggml.padding_token_id", _contents(reader, "tokenizer.ggml.eos_token_id"))
        ),
        "add_bos": bool(_contents(reader, "tokenizer.ggml.add_bos_token", False)),
        "special_tokens": {tokens[i]: i for i, t in enumerate(token_types) if t in (_CONTROL, _USER_DEFINED)},
    }
    return tokenizer, ids


class SmolLMTokenizer:
    """SmolLM2's byte-level BPE with torchtune's ``ModelTokenizer`` interface and its ChatML chat format.

    Implements ``encode`` / ``decode`` (torchtune ``BaseTokenizer``), ``tokenize_messages`` and ``__call__``
    (torchtune ``ModelTokenizer`` + ``Transform``), so torchtune datasets and generation utilities accept it.

    Ids: ``bos_id`` = ``<|im_start|>`` (1), ``eos_id`` = ``pad_id`` = ``<|im_end|>`` (2), as the GGUF metadata says;
    ``endoftext_id`` = ``<|endoftext|>`` (0) separates documents in plain text (the demo's corpus).

    Args:
        tokenizer (Tokenizer): the HF ``tokenizers`` object (see :func:`build_hf_tokenizer`).
        bos_id (int): begin-of-turn id.
        eos_id (int): end-of-turn id.
        pad_id (int): padding id.
        special_tokens (dict[str, int]): control tokens by name.
        add_bos (bool): whether ``encode`` adds ``bos_id`` by default (SmolLM2: False). Default: False
        max_seq_len (int | None): truncate ``tokenize_messages`` output to this length. Default: None
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        special_tokens: dict[str, int],
        add_bos: bool = False,
        max_seq_len: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.special_tokens = dict(special_tokens)
        self.add_bos = add_bos
        self.max_seq_len = max_seq_len
        self.endoftext_id = self.special_tokens.get("<|endoftext|>", eos_id)
        self.stop_tokens = [eos_id, self.endoftext_id]

    @classmethod
    def from_gguf(cls, path: str | Path, max_seq_len: int | None = None) -> SmolLMTokenizer:
        """Read the tokenizer from a GGUF file (only the metadata is read; the file is memory-mapped)."""
        import gguf

        tokenizer, ids = build_hf_tokenizer(gguf.GGUFReader(path))
        return cls(tokenizer, max_seq_len=max_seq_len, **ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token strings in the text are recognised)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: list[Message], add_end_tokens: bool = True) -> tuple[list[int], list[bool]]:
        r"""ChatML, exactly as the GGUF's chat template renders it.

        ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, with SmolLM's default system prompt when
        the first message is not a system message. With ``add_end_tokens=False`` the assistant header of the
        next turn is appended instead (the template's ``add_generation_prompt``), ready for generation.

        Returns:
            tuple[list[int], list[bool]]: tokens and mask (True where the token is masked out of the loss).
        """
        if messages and messages[0].role != "system":
            messages = [Message(role="system", content=DEFAULT_SYSTEM_PROMPT, masked=True), *messages]
        tokens: list[int] = []
        mask: list[bool] = []
        for message in messages:
            text = "".join(item["content"] for item in message.content if item["type"] == "text")
            ids = self.encode(f"<|im_start|>{message.role}\n{text}<|im_end|>\n", add_bos=False)
            tokens.extend(ids)
            mask.extend([message.masked] * len(ids))
        if not add_end_tokens:
            header = self.encode("<|im_start|>assistant\n", add_bos=False)
            tokens.extend(header)
            mask.extend([True] * len(header))
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: dict[str, Any], inference: bool = False) -> dict[str, Any]:
        """torchtune ``Transform``: ``sample["messages"]`` -> ``sample["tokens"]``, ``sample["mask"]``."""
        tokens, mask = self.tokenize_messages(sample.pop("messages"), add_end_tokens=not inference)
        sample.update(tokens=tokens, mask=mask)
        return sample
