"""Data for distillation at the paper's scale: token files, packed windows, ORCAMEL, vocabulary checks.

YAML builders (``_component_``): :func:`packed_token_dataset`, :func:`orcamel_dataset`,
:func:`instruction_dataset`. Pre-tokenisation: :func:`write_token_file` / ``tad-tune tokenize``.
Start-up checks: :func:`check_vocab_alignment`; :mod:`.checks` (tokenizers and datasets, for
``tad-tune validate``). Offline tests and examples: :func:`byte_tokenizer`, a byte-level
``ModelTokenizer`` that needs no files. See ``docs/data.md``.
"""

from tad_torchtune.data.byte_tokenizer import ByteTokenizer, byte_tokenizer
from tad_torchtune.data.orcamel import InstructionDataset, instruction_dataset, orcamel_dataset
from tad_torchtune.data.packed import PackedTokenDataset, packed_token_dataset
from tad_torchtune.data.token_file import open_token_file, read_meta, write_token_file
from tad_torchtune.data.tokenizer_tools import load_tokenizer
from tad_torchtune.data.vocab import VocabAlignmentReport, VocabMismatchError, check_vocab_alignment

__all__ = [
    "ByteTokenizer",
    "InstructionDataset",
    "PackedTokenDataset",
    "VocabAlignmentReport",
    "VocabMismatchError",
    "byte_tokenizer",
    "check_vocab_alignment",
    "instruction_dataset",
    "load_tokenizer",
    "open_token_file",
    "orcamel_dataset",
    "packed_token_dataset",
    "read_meta",
    "write_token_file",
]
