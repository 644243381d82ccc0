"""Export a torchtune model (teacher, pretrained student or a new-architecture student) to a Hugging Face
directory that ``AutoModelForCausalLM.from_pretrained`` and ``lm_eval --model hf`` load as the same model.

The directory gets:

* ``config.json`` written by transformers' own config class of the family (``Qwen2Config``, ``Qwen3Config``,
  ``LlamaConfig`` (with the Llama-3.1/3.2 ``rope_scaling``), ``Phi3Config``, ``PhiConfig``,
  ``Gemma2Config``) from the model's real dims -- never copied from the teacher,
  whose ``num_hidden_layers`` etc. would be wrong for a student (lm-eval would then silently evaluate a
  half-random model);
* the weights in HF naming (safetensors, sharded above ``max_shard_size`` with an index);
* the tokenizer files of ``tokenizer_dir`` (``tokenizer_class: TokenizersBackend`` rewritten to
  ``PreTrainedTokenizerFast`` so transformers 4 loads them too);
* ``generation_config.json`` (``tokenizer_dir``'s if it has one, else from the bos/eos/pad ids given).

Python::

    from tad_torchtune.models.export import export_hf
    export_hf(model, "qwen2", {"num_heads": 16, "num_kv_heads": 16, "max_seq_len": 2048}, "out/hf",
              tokenizer_dir="/models/Qwen1.5-1.8B")

CLI (``tad-tune export-hf``)::

    tad-tune export-hf --config configs/qwen1.5_1.8b_to_1.2b.yaml --weights out/epoch_0 --out out/hf \\
        --tokenizer-dir /models/Qwen1.5-1.8B
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tad_torchtune.models.registry import FAMILIES, component_builder

__all__ = ["export_hf", "hf_config", "to_hf_state_dict", "from_hf_state_dict", "load_weights", "main"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _fill_args(family: str, model_args: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Builder defaults < model_args < what the state dict says (vocab, widths, layers, tying)."""
    import inspect

    sig = inspect.signature(component_builder(family))
    a = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    a.update({k: v for k, v in model_args.items() if k != "_component_"})
    emb = sd["tok_embeddings.weight"]
    a["vocab_size"], a["embed_dim"] = emb.shape
    a["num_layers"] = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    a["intermediate_dim"] = sd["layers.0.mlp.w1.weight"].shape[0]
    a["tie_word_embeddings"] = "output.weight" not in sd
    if "num_heads" not in a:
        raise ValueError(f"model_args for family {family!r} must give num_heads (cannot be read from the weights)")
    q_rows = sd["layers.0.attn.q_proj.weight"].shape[0]
    a["head_dim"] = a.get("head_dim") or q_rows // a["num_heads"]
    a["num_kv_heads"] = sd["layers.0.attn.k_proj.weight"].shape[0] // a["head_dim"]
    return a


def hf_config(
    family: str,
    args: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
):
    """A transformers config for ``family`` with the dims in ``args`` (full component-builder kwargs).

    Returns:
        transformers.PretrainedConfig: with ``architectures`` set, ready for ``save_pretrained``.
    """
    import transformers as T

    common = dict(
        vocab_size=args["vocab_size"],
        hidden_size=args["embed_dim"],
        intermediate_size=args["intermediate_dim"],
        num_hidden_layers=args["num_layers"],
        num_attention_heads=args["num_heads"],
        max_position_embeddings=args["max_seq_len"],
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=args["tie_word_embeddings"],
    )
    kv = args["num_kv_heads"]
    if family == "qwen2":
        cfg = T.Qwen2Config(
            **common,
            num_key_value_heads=kv,
            rms_norm_eps=args["norm_eps"],
            rope_theta=float(args["rope_base"]),
            use_sliding_window=False,
        )
        arch = "Qwen2ForCausalLM"
    elif family == "qwen3":
        cfg = T.Qwen3Config(
            **common,
            num_key_value_heads=kv,
            head_dim=args["head_dim"],
            rms_norm_eps=args["norm_eps"],
            rope_theta=float(args["rope_base"]),
            attention_bias=False,
            use_sliding_window=False,
        )
        arch = "Qwen3ForCausalLM"
    elif family in ("llama2", "llama3", "llama3_1", "llama3_2"):
        rope = {}
        if family in ("llama3_1", "llama3_2"):  # torchtune's Llama3ScaledRoPE (low 1, high 4, old context 8192)
            rope["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": float(args["scale_factor"]),
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        cfg = T.LlamaConfig(
            **common,
            num_key_value_heads=kv,
            rms_norm_eps=args["norm_eps"],
            rope_theta=float(args["rope_base"]),
            head_dim=args["head_dim"],
            **rope,
        )
        arch = "LlamaForCausalLM"
    elif family == "phi3":
        cfg = T.Phi3Config(
            **common,
            num_key_value_heads=kv,
            rms_norm_eps=args["norm_eps"],
            rope_theta=float(args["rope_base"]),
            original_max_position_embeddings=args["max_seq_len"],
            sliding_window=None,  # torchtune's phi3 attends to the whole context
        )
        arch = "Phi3ForCausalLM"
    elif family == "phi2":
        cfg = T.PhiConfig(
            **common,
            num_key_value_heads=kv,
            layer_norm_eps=args["norm_eps"],
            rope_theta=float(args["rope_base"]),
            partial_rotary_factor=args["partial_rotary_factor"],
            hidden_act="gelu_new",
        )
        arch = "PhiForCausalLM"
    elif family == "gemma2":
        if args.get("attn_impl") == "sdpa":
            raise ValueError("a Gemma-2 built with attn_impl='sdpa' has no attention soft-cap; HF's model does")
        cfg = T.Gemma2Config(
            **common,
            num_key_value_heads=kv,
            head_dim=args["head_dim"],
            rms_norm_eps=args["norm_eps"],
            rope_theta=float(args["rope_base"]),
            query_pre_attn_scalar=args["query_pre_attn_scalar"] or args["head_dim"],
            sliding_window=args["sliding_window"],
            attn_logit_softcapping=args["attn_logit_softcapping"],
            final_logit_softcapping=args["final_logit_softcapping"],
            hidden_activation="gelu_pytorch_tanh",
        )
        arch = "Gemma2ForCausalLM"
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    cfg.architectures = [arch]
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def to_hf_state_dict(family: str, args: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchtune-naming state dict -> HF naming for ``family`` (``args``: full builder kwargs)."""
    h, kv, d, hd = args["num_heads"], args["num_kv_heads"], args["embed_dim"], args["head_dim"]
    if family == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        return qwen2_tune_to_hf(sd, h, kv, d, hd, tie_word_embeddings=args["tie_word_embeddings"])
    if family == "qwen3":
        from tad_torchtune.models.qwen3 import qwen3_tune_to_hf

        return qwen3_tune_to_hf(sd)
    if family in ("llama2", "llama3", "llama3_1", "llama3_2"):
        from torchtune.models.convert_weights import tune_to_hf

        out = tune_to_hf(sd, h, kv, d, hd)
        return out
    if family == "phi3":
        from torchtune.models.phi3._convert_weights import phi3_tune_to_hf

        return phi3_tune_to_hf(sd)
    if family == "phi2":
        from tad_torchtune.models.phi2 import phi2_tune_to_hf

        return phi2_tune_to_hf(sd)
    if family == "gemma2":
        from tad_torchtune.models.gemma2 import gemma2_tune_to_hf

        return gemma2_tune_to_hf(sd, h, kv, d, hd)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def from_hf_state_dict(family: str, hf_cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF naming -> torchtune naming, reading heads/dims from an HF ``config.json`` dict."""
    h, kv, d = hf_cfg["num_attention_heads"], hf_cfg.get("num_key_value_heads") or hf_cfg["num_attention_heads"], 0
    d = hf_cfg["hidden_size"]
    hd = hf_cfg.get("head_dim")
    if family == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        return qwen2_hf_to_tune(sd, h, kv, d, hd, tie_word_embeddings=hf_cfg.get("tie_word_embeddings", False))
    if family == "qwen3":
        from tad_torchtune.models.qwen3 import qwen3_hf_to_tune

        return qwen3_hf_to_tune(sd, tie_word_embeddings=hf_cfg.get("tie_word_embeddings", False))
    if family in ("llama2", "llama3", "llama3_1", "llama3_2"):
        from torchtune.models.convert_weights import hf_to_tune

        return hf_to_tune(sd, h, kv, d, hd)
    if family == "phi3":
        from torchtune.models.phi3._convert_weights import phi3_hf_to_tune

        return phi3_hf_to_tune(sd, *((h, kv, d) if h != kv else (None, None, None)))
    if family == "phi2":
        from tad_torchtune.models.phi2 import phi2_hf_to_tune

        return phi2_hf_to_tune(sd)
    if family == "gemma2":
        from tad_torchtune.models.gemma2 import gemma2_hf_to_tune

        return gemma2_hf_to_tune(sd, h, kv, d, hd)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    tc = out_dir / "tokenizer_config.json"
    if tc.is_file():
        data = json.loads(tc.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":  # written by transformers 5; v4 cannot load it
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            tc.write_text(json.dumps(data, indent=2))
    if not copied:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in tokenizer_dir={tokenizer_dir}")
    return copied


def export_hf(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    family: str,
    model_args: dict[str, Any],
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write an HF model directory for a torchtune model.

    Args:
        model_or_state_dict (nn.Module | dict[str, torch.Tensor]): the model, or its state dict in torchtune naming.
        family (str): ``qwen2``, ``qwen3``, ``llama2``, ``llama3``, ``llama3_1``, ``llama3_2``, ``phi3``, ``phi2``
            or ``gemma2``
            (see :mod:`tad_torchtune.models.registry`; :func:`tad_torchtune.models.registry.resolve` gives it
            from a YAML model node).
        model_args (dict[str, Any]): the family component builder's kwargs; at least ``num_heads`` and
            ``max_seq_len``, plus non-default ``norm_eps``/``rope_base``/caps. Vocabulary, widths, layer count,
            KV heads and tying are read from the weights.
        out_dir (str | Path): output directory (created).
        tokenizer_dir (str | Path | None): directory whose tokenizer files (and ``generation_config.json``)
            are copied, usually the teacher's HF directory. Default: None (no tokenizer; lm-eval then needs
            ``tokenizer=...``)
        dtype (torch.dtype | None): cast the weights (and ``config.dtype``); None keeps them. Default: None
        bos_token_id, eos_token_id, pad_token_id: written to config and generation config when given.
        max_shard_size (str): safetensors shard size. Default: "5GB"

    Returns:
        Path: ``out_dir``.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    sd = {k: v for k, v in sd.items() if not k.endswith(("rope.cache", "pos_embeddings.cache", ".theta"))}
    args = _fill_args(family, model_args, sd)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen_src = Path(tokenizer_dir) / "generation_config.json" if tokenizer_dir else None
    if gen_src is not None and gen_src.is_file():
        gen = json.loads(gen_src.read_text())
        bos_token_id = gen.get("bos_token_id", bos_token_id) if bos_token_id is None else bos_token_id
        eos_token_id = gen.get("eos_token_id", eos_token_id) if eos_token_id is None else eos_token_id
        pad_token_id = gen.get("pad_token_id", pad_token_id) if pad_token_id is None else pad_token_id
    hf_sd = to_hf_state_dict(family, args, sd)
    w_dtype = dtype or next(iter(hf_sd.values())).dtype
    hf_sd = {k: v.detach().to("cpu", w_dtype).contiguous() for k, v in hf_sd.items()}
    cfg = hf_config(
        family, args, dtype=w_dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    cfg.save_pretrained(out)
    save_torch_state_dict(hf_sd, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if gen_src is not None and gen_src.is_file():
        shutil.copyfile(gen_src, out / "generation_config.json")
    else:
        GenerationConfig(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        ).save_pretrained(out)
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out)
    return out


def load_weights(path: str | Path, family: str | None = None) -> dict[str, torch.Tensor]:
    """Load a torchtune-naming state dict from ``path``.

    ``path`` may be a ``.pt``/``.bin`` file (a state dict or ``{"model": state dict}``, as torchtune's
    ``FullModelTorchTuneCheckpointer`` and our step checkpoints write), a ``.safetensors`` file, or a directory
    of ``*.safetensors`` (e.g. ``epoch_N/`` of ``HFCheckpointer``). HF naming (``model.layers...``) is
    converted using ``family`` and the directory's ``config.json``.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            pts = sorted(p.glob("*.pt")) + sorted(p.glob("*.bin"))
            if not pts:
                raise FileNotFoundError(f"no *.safetensors / *.pt / *.bin weights in {p}")
            files = pts
    else:
        files = [p]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            sd.update(load_file(f))
        else:
            obj = torch.load(f, map_location="cpu", weights_only=True)
            sd.update(obj.get("model", obj) if isinstance(obj, dict) and "model" in obj else obj)
    if any(k.startswith("model.") or k.startswith("lm_head") for k in sd):
        cfg_path = (p if p.is_dir() else p.parent) / "config.json"
        if family is None or not cfg_path.is_file():
            raise ValueError(f"{p} holds HF-named weights; converting them needs family= and {cfg_path}")
        sd = from_hf_state_dict(family, json.loads(cfg_path.read_text()), sd)
    return sd


def main(argv: list[str] | None = None) -> int:
    """``tad-tune export-hf``: torchtune weights + the experiment config -> an HF directory."""
    parser = argparse.ArgumentParser(
        prog="tad-tune export-hf",
        description="Export a torchtune model (e.g. a distilled student) to a Hugging Face directory with its own "
        "config.json, weights, tokenizer files and generation config, loadable by AutoModelForCausalLM and "
        "`lm_eval --model hf --model_args pretrained=OUT`.",
    )
    parser.add_argument("--config", required=True, help="experiment YAML; its `model` node says the architecture")
    parser.add_argument(
        "--model-key", default="model", help="which node of the config to export (`model` or `teacher_model`)"
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="a .pt/.safetensors file or a directory (e.g. OUTPUT_DIR/epoch_0) with the model's weights",
    )
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here (the teacher's HF dir)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights")
    parser.add_argument("--force", action="store_true", help="write into --out even if it is a non-empty folder")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. output_dir=/x)")
    ns = parser.parse_args(argv)
    out_dir = Path(ns.out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not ns.force:
        what = "a file" if not out_dir.is_dir() else f"a non-empty folder ({len(list(out_dir.iterdir()))} entries)"
        raise FileExistsError(
            f"--out {out_dir} is {what}: exporting there would mix files with what it holds (a run folder?); "
            "give a new or empty folder, or add --force to write into it anyway"
        )

    from omegaconf import OmegaConf

    from tad_torchtune.models.registry import resolve

    cfg = OmegaConf.merge(OmegaConf.load(ns.config), OmegaConf.from_dotlist(ns.overrides))
    node = OmegaConf.to_container(cfg[ns.model_key], resolve=True)
    family, args = resolve(node)
    sd = load_weights(ns.weights, family)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[ns.dtype]
    out = export_hf(sd, family, args, ns.out, ns.tokenizer_dir, dtype=dtype)
    print(f"wrote {out} ({family}, {args['num_layers']} layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
