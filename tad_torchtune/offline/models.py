"""Models for the offline pass: built from a recipe-style config, and the per-token log-probabilities they give."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class LoadedModel:
    """A model built for the offline pass.

    Attributes:
        model (torch.nn.Module): in eval mode, gradients off, on its device and dtype.
        fingerprint (str): :func:`~tad_torchtune.offline.engine.model_fingerprint` of its weights.
        description (dict): config section, checkpoint folder, dtype (recorded in the manifest).
    """

    model: torch.nn.Module
    fingerprint: str
    description: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, **self.description}


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_model(
    config: Any,
    model_key: str = "teacher_model",
    checkpointer_key: str = "teacher_checkpointer",
    *,
    overrides: Sequence[str] = (),
    device: torch.device | str | None = None,
    dtype: str = "bf16",
) -> LoadedModel:
    """Build ``config[model_key]`` with weights from ``config[checkpointer_key]`` (torchtune ``config.instantiate``
    and our/torchtune checkpointers, loaded strictly), as the recipe does.

    Args:
        config: a YAML path, a shipped config name (``qwen1.5_1.8b_to_1.2b``) or a DictConfig.
        model_key (str): ``teacher_model`` or ``model`` (or any section holding a model). Default: teacher.
        checkpointer_key (str): the section with its weights. Default: ``teacher_checkpointer``.
        overrides (Sequence[str]): ``key=value`` overrides (e.g. ``assets_dir=/tmp/x``). Default: ().
        device (torch.device | str | None): None picks :func:`default_device`. Default: None.
        dtype (str): ``bf16`` / ``fp32`` / ``fp16``. Default: ``bf16``.

    Returns:
        LoadedModel: the model, its fingerprint and a description.
    """
    from omegaconf import DictConfig, OmegaConf

    from tad_torchtune.config_loader import load_config
    from tad_torchtune.eval.loading import build_model, resolve_device_dtype
    from tad_torchtune.offline.engine import model_fingerprint

    cfg = config if isinstance(config, DictConfig) else load_config(config, overrides)
    if isinstance(config, DictConfig) and overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    dev, dt = resolve_device_dtype(str(device) if device is not None else str(default_device()), dtype)
    model = build_model(cfg, model_key, checkpointer_key, dev, dt)
    section = OmegaConf.to_container(cfg[model_key], resolve=True)
    ck = cfg[checkpointer_key]
    desc = {
        "component": section.get("_component_") if isinstance(section, dict) else None,
        "checkpoint_dir": str(Path(str(ck.get("checkpoint_dir"))).resolve()) if ck.get("checkpoint_dir") else None,
        "dtype": str(dt).removeprefix("torch."),
    }
    return LoadedModel(model=model, fingerprint=model_fingerprint(model), description=desc)


def load_tokenizer(config: Any, overrides: Sequence[str] = ()) -> Any:
    """``config.tokenizer`` instantiated (the student's tokenizer in our configs; teacher and student share it)."""
    from omegaconf import DictConfig

    from tad_torchtune.config_loader import load_config
    from tad_torchtune.eval.loading import build_tokenizer

    cfg = config if isinstance(config, DictConfig) else load_config(config, overrides)
    try:
        return build_tokenizer(cfg)
    except RuntimeError as err:  # sentencepiece reports a missing model file as RuntimeError("NOT_FOUND: ...")
        if "NOT_FOUND" in str(err) or "No such file" in str(err):
            raise FileNotFoundError(f"the config's tokenizer could not be built: {str(err).strip()}") from err
        raise


def model_vocab(model: torch.nn.Module) -> int:
    """Number of output rows of a torchtune decoder (its vocabulary)."""
    emb = getattr(model, "tok_embeddings", None)
    if emb is None or not hasattr(emb, "num_embeddings"):
        raise ValueError(f"{type(model).__name__} has no tok_embeddings: not a torchtune TransformerDecoder")
    return int(emb.num_embeddings)


def logits_of(model: torch.nn.Module, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``model(tokens)`` as one ``[B, T, V]`` tensor (chunked outputs are concatenated)."""
    out = model(tokens, **kwargs)
    return torch.cat(out, dim=1) if isinstance(out, list) else out


def token_logprobs(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p_model(labels[b, t] | inputs[b, :t+1])`` in fp32, ``[B, T]``.

    The softmax is computed in fp32 one row at a time, so the extra memory is one ``[T, V]`` fp32 matrix
    beside the model's ``[B, T, V]`` logits (in the model's dtype).

    Args:
        model (torch.nn.Module): a torchtune decoder.
        inputs (torch.Tensor): int64 ``[B, T]``.
        labels (torch.Tensor): int64 ``[B, T]`` (next tokens), each in the model's vocabulary.
    """
    vocab = model_vocab(model)
    top = int(labels.max())
    if top >= vocab or int(inputs.max()) >= vocab:
        raise ValueError(
            f"token id {max(top, int(inputs.max()))} is outside the model's vocabulary of {vocab}; "
            "the corpus was tokenised for another model"
        )
    logits = logits_of(model, inputs)
    out = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    for b in range(logits.shape[0]):
        row = logits[b].float()
        out[b] = row.gather(-1, labels[b, :, None]).squeeze(-1) - torch.logsumexp(row, dim=-1)
    return out


def qwen2_from_hf_config(checkpoint_dir: str | Path, max_seq_len: int = 2048) -> torch.nn.Module:
    """A torchtune Qwen2 decoder with the dims of ``checkpoint_dir/config.json`` (an HF ``Qwen2ForCausalLM``).

    For small reference models that have no builder of their own, e.g. MiniPLM's reference
    ``MiniLLM/Ref-Pretrain-Qwen-104M``: ``reference_model: {_component_: tad_torchtune.offline.models.
    qwen2_from_hf_config, checkpoint_dir: /models/Ref-Pretrain-Qwen-104M}`` with an ``HFCheckpointer`` of
    ``model_type: QWEN2``.

    Args:
        checkpoint_dir (str | Path): folder with the HF ``config.json``.
        max_seq_len (int): RoPE cache length. Default: 2048.

    Raises:
        ValueError: the config is not a Qwen2 one.
    """
    import json

    from torchtune.models.qwen2._component_builders import qwen2

    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: checkpoint_dir must be an HF model folder")
    c = json.loads(path.read_text())
    if c.get("model_type") != "qwen2":
        raise ValueError(f"{path} describes model_type={c.get('model_type')!r}; this builder reads qwen2 configs")
    return qwen2(
        vocab_size=c["vocab_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        embed_dim=c["hidden_size"],
        intermediate_dim=c["intermediate_size"],
        max_seq_len=max_seq_len,
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_base=c.get("rope_theta", 1_000_000.0),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
