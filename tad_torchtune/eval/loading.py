"""Build models, tokenizers and held-out batches from torchtune YAML configs (eval recipe and diagnose CLI)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_DTYPES.update({"fp16": torch.float16, "float16": torch.float16})


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """``device`` (``cpu``, ``cuda``, ``cuda:1``; None picks cuda when present) and ``dtype`` (fp32, bf16, fp16)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (dtype or "fp32").lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return dev, _DTYPES[key]


def build_tokenizer(cfg: DictConfig):
    """Instantiate ``cfg.tokenizer`` (any torchtune tokenizer: ``encode(text, add_bos, add_eos)``, ``decode``)."""
    from torchtune import config

    if cfg.get("tokenizer") is None:
        raise ValueError("the config has no 'tokenizer' section; add one, e.g. _component_: torchtune.models...")
    return config.instantiate(cfg.tokenizer)


_NOT_WEIGHTS = ("adapter", "optimizer", "recipe_state", "training_state", "rng")


def _detect_checkpoint_files(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(p.name for p in ckpt_dir.glob(pattern) if not any(s in p.name for s in _NOT_WEIGHTS))
        if files:
            return files
    raise FileNotFoundError(f"no *.safetensors/*.bin/*.pt weights in checkpoint directory {ckpt_dir}")


def build_model(
    cfg: DictConfig,
    model_key: str,
    checkpointer_key: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    checkpoint_dir: str | Path | None = None,
) -> torch.nn.Module:
    """Instantiate ``cfg[model_key]`` and load weights through ``cfg[checkpointer_key]`` (strictly).

    Args:
        cfg (DictConfig): the config.
        model_key (str): e.g. ``model`` or ``teacher_model``.
        checkpointer_key (str): e.g. ``checkpointer`` or ``teacher_checkpointer``.
        device (torch.device): where the model lives.
        dtype (torch.dtype): parameter dtype.
        checkpoint_dir (str | Path | None): read the weights from this directory instead (its weight files are
            detected), e.g. one ``epoch_N`` output of the training recipe. ``checkpoint_files: auto`` in the
            config detects them too. Default: None

    Returns:
        torch.nn.Module: the model in eval mode with gradients off.
    """
    from torchtune import config, training

    if cfg.get(model_key) is None:
        raise ValueError(f"the config has no {model_key!r} section")
    ck_cfg = cfg.get(checkpointer_key)
    if ck_cfg is None:
        raise ValueError(f"the config has no {checkpointer_key!r} section; the model's weights must come from one")
    ck_cfg = OmegaConf.create(OmegaConf.to_container(ck_cfg, resolve=True))
    if checkpoint_dir is not None:
        ck_cfg.checkpoint_dir = str(checkpoint_dir)
        ck_cfg.checkpoint_files = "auto"
    if ck_cfg.get("checkpoint_files") in (None, "auto"):  # whatever weights the directory holds
        ck_cfg.checkpoint_files = _detect_checkpoint_files(Path(ck_cfg.checkpoint_dir))
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg[model_key])
    with tempfile.TemporaryDirectory(prefix="tad_eval_ckpt_") as scratch:
        if ck_cfg.get("output_dir") is None:
            ck_cfg.output_dir = scratch  # torchtune requires one; loading never writes there
        state = config.instantiate(ck_cfg).load_checkpoint()[training.MODEL_KEY]
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def model_vocab_size(model_cfg: DictConfig) -> int | None:
    """The ``vocab_size`` a model config states, if any."""
    v = model_cfg.get("vocab_size")
    return int(v) if v is not None else None


def _read_texts(path: Path) -> list[str]:
    if path.is_dir():
        out: list[str] = []
        for p in sorted(path.rglob("*")):
            if p.suffix in (".txt", ".jsonl", ".json"):
                out += _read_texts(p)
        return out
    if path.suffix in (".jsonl", ".json"):
        texts = []
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                text = row.get("text") if isinstance(row, dict) else None
                if text is None:
                    raise ValueError(f"{path}:{line_no}: each JSON line needs a 'text' field, got keys {list(row)}")
                texts.append(text)
        return texts
    # Plain text: paragraphs (blank-line separated) are the documents, so a large file is read lazily enough.
    return [p for p in path.read_text().split("\n\n") if p.strip()]


def heldout_batches(
    tokenizer, text: str | Path, seq_len: int, batch_size: int, max_batches: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Tokenise held-out text into packed rows: ``tokens`` ``[B, seq_len]`` and shifted ``labels`` ``[B, seq_len]``.

    Each document is encoded with BOS and EOS, documents are concatenated and cut into non-overlapping
    windows of ``seq_len + 1`` tokens (the last partial window is dropped).
    """
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"held-out text {path} not found")
    need = None if max_batches is None else max_batches * batch_size * (seq_len + 1)
    ids: list[int] = []
    for doc in _read_texts(path):
        ids += tokenizer.encode(doc, add_bos=True, add_eos=True)
        if need is not None and len(ids) >= need:
            break
    n_rows = len(ids) // (seq_len + 1)
    if n_rows == 0:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one row of seq_len+1={seq_len + 1}")
    rows = torch.tensor(ids[: n_rows * (seq_len + 1)], dtype=torch.long).view(n_rows, seq_len + 1)
    batches = [
        {"tokens": rows[s : s + batch_size, :-1], "labels": rows[s : s + batch_size, 1:]}
        for s in range(0, n_rows, batch_size)
    ]
    return batches[:max_batches] if max_batches is not None else batches
