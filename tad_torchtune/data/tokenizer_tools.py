"""One small interface over the tokenizers a run can use: torchtune ``ModelTokenizer`` s and HF ``tokenizer.json`` dirs.

The token-file writer, the packed dataset and the vocabulary check only need four things from a tokenizer:
encode text without special tokens, its BOS/EOS ids, its vocabulary size (including special tokens) and the
string of one id. torchtune's tokenizers expose these under different names (``Llama2Tokenizer`` keeps the
SentencePiece model in ``_spm_model``, ``Phi3MiniTokenizer`` has special ids above ``vocab_size``,
``Qwen2Tokenizer`` has no ``vocab_size`` at all, ``HuggingFaceBaseTokenizer.encode(add_bos=False)`` still
adds a BOS when the HF post-processor does), so this module hides the differences.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Text whose encoding identifies a tokenizer: plain words, digits, whitespace runs, accents, CJK, LaTeX, code.
_PROBE_TEXTS = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, tabs\tand\nnew lines\n\n end.",
    "Numbers 1234567 and 3.14159, x^2 + y^2 = z^2, \\frac{a}{b} $\\sqrt{2}$.",
    "Ünïcödé café naïve — 数学是科学的语言。 Добрый день.",
    "def f(x):\n    return x * 2  # code",
)


def load_tokenizer(spec: str | Path | Mapping[str, Any], **kwargs: Any) -> Any:
    """Build a tokenizer from a user-facing description.

    Args:
        spec (str | Path | Mapping): one of
            - a mapping with ``_component_`` (a torchtune config node, e.g.
              ``{"_component_": "torchtune.models.llama2.llama2_tokenizer", "path": ".../tokenizer.model"}``);
            - a dotted builder name (``torchtune.models.llama2.llama2_tokenizer``), called with ``kwargs``;
            - a YAML config file whose ``tokenizer:`` node is used (a recipe config);
            - a directory holding an HF ``tokenizer.json`` (and ``tokenizer_config.json`` or
              ``generation_config.json``), loaded with torchtune's ``HuggingFaceBaseTokenizer``; a
              ``tokenizer.json`` file, or a folder with only that file, is read by :class:`TokenizerJSON`
              (``bos_id``/``eos_id`` kwargs choose the special ids).
        **kwargs: extra builder arguments (override the mapping's).

    Returns:
        The tokenizer object.

    Raises:
        ValueError: if ``spec`` is none of the above.
    """
    from omegaconf import DictConfig, OmegaConf
    from torchtune import config as tt_config

    if isinstance(spec, Mapping | DictConfig):
        node = OmegaConf.create(dict(spec))
        for key, value in kwargs.items():
            node[key] = value
        if "_component_" not in node:
            raise ValueError(
                f"tokenizer config {dict(spec)} has no `_component_`; add e.g. "
                "`_component_: torchtune.models.llama2.llama2_tokenizer`"
            )
        return tt_config.instantiate(node)
    path = Path(spec)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        return _hf_folder_tokenizer(path, **kwargs)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        cfg = OmegaConf.load(path)
        if "tokenizer" not in cfg:
            raise ValueError(f"config {path} has no `tokenizer:` node")
        return load_tokenizer(OmegaConf.to_container(cfg.tokenizer, resolve=True), **kwargs)
    text = str(spec)
    if "." in text and not path.exists():
        module_name, _, attr = text.rpartition(".")
        try:
            builder = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import tokenizer builder {text!r}: {err}") from err
        return builder(**kwargs)
    raise ValueError(
        f"don't know how to build a tokenizer from {spec!r}: give a dotted builder name "
        "(torchtune.models.llama2.llama2_tokenizer with path=...), an HF tokenizer directory, or a recipe YAML"
    )


# Names by which a bare tokenizer.json's end/begin-of-text tokens are found when no config file states them.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>")


class TokenizerJSON:
    """An HF ``tokenizer.json`` alone (no ``tokenizer_config.json``/``generation_config.json``), as a tokenizer
    with ``encode``/``decode``/``bos_id``/``eos_id``: what torchtune's ``HuggingFaceBaseTokenizer`` refuses.

    Args:
        path (str | Path): the ``tokenizer.json`` file.
        bos_id (int | None): BOS id; None looks for a special token named ``<s>``, ``<bos>`` or
            ``<|begin_of_text|>`` and else uses none. Default: None
        eos_id (int | None): EOS id (separates documents); None looks for ``<|endoftext|>``, ``</s>``, ``<eos>``
            or ``<|end_of_text|>``. Default: None

    Raises:
        ValueError: when no EOS is given or found (the message names ``eos_id``).
    """

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.path = str(path)
        self.tokenizer = Tokenizer.from_file(self.path)
        specials = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.eos_id = eos_id if eos_id is not None else next((specials[n] for n in _EOS_NAMES if n in specials), None)
        self.bos_id = bos_id if bos_id is not None else next((specials[n] for n in _BOS_NAMES if n in specials), None)
        if self.eos_id is None:
            raise ValueError(
                f"{path} has no tokenizer_config.json/generation_config.json beside it and no special token named "
                f"{' / '.join(_EOS_NAMES)}; give the end-of-text id: --tokenizer-arg eos_id=N"
            )
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if add_bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def _hf_folder_tokenizer(path: Path, **kwargs: Any) -> Any:
    """An HF tokenizer folder, or one ``tokenizer.json`` file."""
    tok_json = path / "tokenizer.json" if path.is_dir() else path
    if not tok_json.is_file():
        raise ValueError(
            f"tokenizer directory {path} has no tokenizer.json (an HF fast-tokenizer folder or file is needed)"
        )
    folder = tok_json.parent
    cfg_json, gen_json = folder / "tokenizer_config.json", folder / "generation_config.json"
    if kwargs or not (cfg_json.is_file() or gen_json.is_file()):
        return TokenizerJSON(tok_json, **kwargs)
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    return HuggingFaceBaseTokenizer(
        str(tok_json),
        tokenizer_config_json_path=str(cfg_json) if cfg_json.is_file() else None,
        generation_config_path=str(gen_json) if gen_json.is_file() else None,
    )


def _hf_tokenizer(tok: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` inside ``tok`` (or ``tok`` itself), else None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return None
    if isinstance(tok, Tokenizer):
        return tok
    inner = getattr(tok, "tokenizer", None)
    return inner if isinstance(inner, Tokenizer) else None


def _spm(tok: Any) -> Any | None:
    """The ``sentencepiece.SentencePieceProcessor`` inside a torchtune tokenizer, else None."""
    for obj in (tok, getattr(tok, "_spm_model", None)):
        proc = getattr(obj, "spm_model", None)
        if proc is not None and hasattr(proc, "id_to_piece"):
            return proc
    return None


def special_tokens(tok: Any) -> dict[str, int]:
    """Name -> id of the special tokens a torchtune tokenizer declares beyond its base vocabulary."""
    specials = getattr(tok, "special_tokens", None)
    return dict(specials) if isinstance(specials, Mapping) else {}


def vocab_size(tok: Any) -> int:
    """Number of ids the tokenizer can emit: base vocabulary plus special tokens (max id + 1).

    Raises:
        ValueError: when it cannot be determined.
    """
    sizes: list[int] = []
    hf = _hf_tokenizer(tok)
    if hf is not None:
        sizes.append(hf.get_vocab_size(with_added_tokens=True))
    base = getattr(tok, "vocab_size", None)
    if isinstance(base, int):
        sizes.append(base)
    encoder = getattr(tok, "encoder", None)
    if isinstance(encoder, Mapping):
        sizes.append(max(encoder.values()) + 1)
    specials = special_tokens(tok)
    if specials:
        sizes.append(max(specials.values()) + 1)
    if not sizes:
        raise ValueError(f"cannot tell the vocabulary size of {describe(tok)}; pass vocab_size explicitly")
    return max(sizes)


def describe(tok: Any) -> str:
    """A short human name: class plus the file it was loaded from when known."""
    name = f"{type(tok).__module__}.{type(tok).__qualname__}"
    for attr in ("path", "_path", "tokenizer_json_path"):
        value = getattr(tok, attr, None)
        if isinstance(value, str | Path):
            return f"{name}({value})"
    return name


def bos_id(tok: Any) -> int | None:
    value = getattr(tok, "bos_id", None)
    return int(value) if isinstance(value, int) and value >= 0 else None


def eos_id(tok: Any) -> int | None:
    value = getattr(tok, "eos_id", None)
    return int(value) if isinstance(value, int) and value >= 0 else None


def encode_plain(tok: Any, text: str) -> list[int]:
    """Encode ``text`` with no BOS/EOS, whatever the tokenizer kind."""
    hf = _hf_tokenizer(tok)
    if hf is not None:
        # torchtune's HuggingFaceBaseTokenizer.encode(add_bos=False) still gets a BOS from the HF post-processor.
        return hf.encode(text, add_special_tokens=False).ids
    return list(tok.encode(text, add_bos=False, add_eos=False))


def encode_batch_plain(tok: Any, texts: list[str]) -> list[list[int]]:
    """Encode many texts with no special tokens (the HF Rust path batches natively)."""
    hf = _hf_tokenizer(tok)
    if hf is not None:
        return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    return [list(tok.encode(t, add_bos=False, add_eos=False)) for t in texts]


def token_string(tok: Any, token_id: int) -> str:
    """The vocabulary entry of ``token_id``: the piece itself when the tokenizer exposes it, else its decoding.

    Pieces are compared rather than decodings because decoding a single id loses the SentencePiece word
    boundary (``▁Hello`` and ``Hello`` both decode to ``Hello``).
    """
    specials = {v: k for k, v in special_tokens(tok).items()}
    if token_id in specials:
        return specials[token_id]
    hf = _hf_tokenizer(tok)
    if hf is not None:
        piece = hf.id_to_token(token_id)
        return "" if piece is None else piece
    proc = _spm(tok)
    if proc is not None:
        return proc.id_to_piece(token_id) if token_id < proc.get_piece_size() else ""
    decoder = getattr(tok, "decoder", None)
    if isinstance(decoder, Mapping):
        return decoder.get(token_id, "")
    return tok.decode([token_id])


def fingerprint(tok: Any) -> str:
    """sha256 (16 hex digits) of the plain encodings of fixed probe texts: equal for tokenizers that split alike."""
    encodings = [encode_plain(tok, t) for t in _PROBE_TEXTS]
    return hashlib.sha256(json.dumps(encodings).encode()).hexdigest()[:16]
