"""Export a torchtune model (teacher, pretrained student or a new-architecture student) to a Hugging Face
directory that ``AutoModelForCausalLM.from_pretrained`` and ``lm_eval --model hf`` load as the same model.

The directory gets:

* ``config.json`` written by transformers' own config class of the family (``Qwen2Config``, ``Qwen3Config``,
  ``LlamaConfig`` (with the Llama-3.1/3.2 ``rope_scaling``), ``Phi3Config``, ``PhiConfig``,
  ``Gemma2Config``) from the model's real dims -- never copied from the teacher,
  whose ``num_hidden_layers`` etc. would be wrong for a student (lm-eval would then silently evaluate a
  half-random model);
* the weights in HF naming (safetensors, sharded above ``max_shard_size`` with an index);
* the tokenizer the model was trained with: the files of ``tokenizer_dir``, else the training tokenizer converted
  (:mod:`tad_torchtune.models.standalone`), with ``tokenizer_config.json`` naming BOS/EOS/pad;
* ``generation_config.json`` with the BOS/EOS(/stop)/pad ids (sampling defaults of ``tokenizer_dir``'s kept);
* a model card ``README.md`` (teacher, loss, data, steps, tokens, held-out metrics) when ``facts`` are given.

Python::

    from tad_torchtune.models.export import export_hf
    export_hf(model, "qwen2", {"num_heads": 16, "num_kv_heads": 16, "max_seq_len": 2048}, "out/hf",
              tokenizer_dir="/models/Qwen1.5-1.8B")

CLI (``tad-tune export-hf``); the run folder's ``torchtune_config.yaml`` gives the architecture, the tokenizer
and the model card's facts::

    tad-tune export-hf --weights out/epoch_0 --out out/hf
    tad-tune export-hf --config configs/qwen1.5_1.8b_to_1.2b.yaml --weights out/epoch_0 --out out/hf \\
        --tokenizer-dir /models/Qwen1.5-1.8B
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tad_torchtune.models import standalone
from tad_torchtune.models.registry import FAMILIES, component_builder, resolve
from tad_torchtune.models.standalone import TOKENIZER_FILES  # noqa: F401  (re-exported)
from tad_torchtune.reliability.errors import EXIT_REFUSED

__all__ = ["export_hf", "hf_config", "to_hf_state_dict", "from_hf_state_dict", "load_weights", "main"]

log = logging.getLogger(__name__)


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


def _tokenizer_files(
    out: Path, tokenizer_dir: str | Path | None, tokenizer: Any, notes: list[str]
) -> tuple[str | None, dict[str, Any]]:
    """Write the tokenizer into ``out``; returns (what was written or None, special ids the source states)."""
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = standalone.special_ids(tokenizer)
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        copied = standalone.copy_tokenizer_files(src, out)
        gen = (src if src.is_dir() else src.parent) / "generation_config.json"
        if gen.is_file():
            g = json.loads(gen.read_text())
            ids["generation_config"] = g  # its sampling defaults are kept
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if g.get(key) is not None:
                    ids.setdefault(key, g[key])
        return f"{', '.join(copied)} from {src}", ids
    if tokenizer is not None:
        written = standalone.write_tokenizer(tokenizer, out)
        if written is None:
            notes.append(
                f"cannot convert the training tokenizer ({type(tokenizer).__name__}) to HF files; pass "
                "--tokenizer-dir DIR (the HF folder or tokenizer.json it was built from)"
            )
        return written, ids
    notes.append("no tokenizer written: pass --tokenizer-dir DIR (the HF folder the model's tokenizer comes from)")
    return None, ids


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view into a larger storage (weights saved from a 2-process FSDP run load as
    slices of one buffer), which safetensors refuses to write."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


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
    tokenizer: Any = None,
    facts: dict[str, Any] | None = None,
    notes: list[str] | None = None,
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
        tokenizer_dir (str | Path | None): HF tokenizer folder (or one ``tokenizer.json``) whose files (and
            ``generation_config.json``'s special ids) are copied, usually the teacher's HF directory.
            Default: None
        dtype (torch.dtype | None): cast the weights (and ``config.dtype``); None keeps them. Default: None
        bos_token_id, eos_token_id, pad_token_id: override the special ids (else the tokenizer's).
        max_shard_size (str): safetensors shard size. Default: "5GB"
        tokenizer: the instantiated training tokenizer (torchtune ``ModelTokenizer``): its ids are used, and
            when ``tokenizer_dir`` is None it is written as ``tokenizer.json`` if it can be
            (:func:`tad_torchtune.models.standalone.write_tokenizer`). Default: None
        facts (dict | None): run facts (:func:`tad_torchtune.models.standalone.run_facts`); given, a model card
            ``README.md`` is written. Default: None
        notes (list[str] | None): gets one line per piece that could not be known (no tokenizer, no BOS...).

    Returns:
        Path: ``out_dir``.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    notes = notes if notes is not None else []
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    sd = {k: v for k, v in sd.items() if not k.endswith(("rope.cache", "pos_embeddings.cache", ".theta"))}
    args = _fill_args(family, model_args, sd)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, ids = _tokenizer_files(out, tokenizer_dir, tokenizer, notes)
    given = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    ids.update({k: v for k, v in given.items() if v is not None})
    bos, eos, pad = ids.get("bos_token_id"), ids.get("eos_token_id"), ids.get("pad_token_id")
    eos_one = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        notes.append("EOS id unknown: pass --eos-id (lm-eval and generation stop on it)")
    if bos is None:
        notes.append("BOS id unknown (fine for models without one, e.g. Qwen); pass --bos-id if it has one")
    if pad is None and eos_one is not None:
        pad = eos_one  # what transformers' generate falls back to anyway; stated, not left null
    hf_sd = to_hf_state_dict(family, args, sd)
    w_dtype = dtype or next(iter(hf_sd.values())).dtype
    hf_sd = {k: _own_storage(v.detach().to("cpu", w_dtype).contiguous()) for k, v in hf_sd.items()}
    cfg = hf_config(family, args, dtype=w_dtype, bos_token_id=bos, eos_token_id=eos_one, pad_token_id=pad)
    cfg.save_pretrained(out)
    save_torch_state_dict(hf_sd, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    stop = ids.get("stop_token_ids") or eos
    gen_kwargs = {k: v for k, v in ids.get("generation_config", {}).items() if not k.startswith("_")}
    gen_kwargs.pop("transformers_version", None)
    gen_kwargs.update(bos_token_id=bos, eos_token_id=stop, pad_token_id=pad)
    GenerationConfig(**gen_kwargs).save_pretrained(out)
    bad_tokenizer = standalone.finish_tokenizer_config(out, bos, eos_one, pad, args["max_seq_len"])
    if bad_tokenizer:
        notes.append(bad_tokenizer)
    if facts is not None:
        n_params = sum(v.numel() for k, v in sd.items())
        card_ids = {"bos": bos, "eos": stop, "pad": pad}
        (out / "README.md").write_text(
            standalone.model_card(
                facts,
                architecture=cfg.architectures[0],
                family=family,
                num_layers=args["num_layers"],
                num_params=n_params,
                ids=card_ids,
            )
        )
        unknown = standalone.unknown_facts(facts)
        if unknown:
            notes.append("model card: not recorded: " + ", ".join(unknown))
    if written:
        log.info(f"tokenizer: {written}")
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


# Builders that are a family's component builder with other defaults: exported as that family, with the
# wrapper's own defaults filled in from its signature.
def _default_config(weights: Path) -> Path | None:
    return standalone.find_run_config(weights)


def main(argv: list[str] | None = None) -> int:
    """``tad-tune export-hf``: torchtune weights + the experiment config -> a stand-alone HF directory."""
    parser = argparse.ArgumentParser(
        prog="tad-tune export-hf",
        description="Export a torchtune model (e.g. a distilled student) to a Hugging Face directory that stands "
        "alone: config.json, weights, the tokenizer it was trained with, generation_config.json, BOS/EOS/pad ids "
        "and a model card (README.md). Loadable by AutoModelForCausalLM/AutoTokenizer and "
        "`lm_eval --model hf --model_args pretrained=OUT`. What cannot be known is reported with the flag "
        "that supplies it.",
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="a .pt/.safetensors file or a directory (e.g. OUTPUT_DIR/epoch_0) with the model's weights",
    )
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument(
        "--config",
        default=None,
        help="training YAML; its `model` node says the architecture, its `tokenizer` node the tokenizer. "
        "Default: torchtune_config.yaml of the run folder the weights are in (OUTPUT_DIR/epoch_N -> OUTPUT_DIR)",
    )
    parser.add_argument(
        "--model-key", default="model", help="which node of the config to export (`model` or `teacher_model`)"
    )
    parser.add_argument(
        "--tokenizer-dir",
        default=None,
        help="HF tokenizer folder or tokenizer.json to copy. Default: the files the config's tokenizer reads, "
        "or the training tokenizer converted (byte tokenizer, tokenizers-based tokenizers)",
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="export without tokenizer files")
    parser.add_argument("--bos-id", type=int, default=None, help="BOS id (default: the tokenizer's)")
    parser.add_argument("--eos-id", type=int, default=None, help="EOS id (default: the tokenizer's)")
    parser.add_argument("--pad-id", type=int, default=None, help="pad id (default: the tokenizer's, else EOS)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights")
    parser.add_argument("--force", action="store_true", help="write into --out even if it is a non-empty folder")
    card = parser.add_argument_group("model card (README.md); read from the run folder unless given")
    card.add_argument("--teacher", default=None, help="the teacher, e.g. Qwen/Qwen1.5-1.8B")
    card.add_argument("--loss", default=None, help="the loss, e.g. 'CE + TAD (top_k=10, beta=2)'")
    card.add_argument("--data", default=None, help="the training data")
    card.add_argument("--steps", type=int, default=None, help="optimizer steps")
    card.add_argument("--tokens", type=int, default=None, help="training tokens")
    card.add_argument(
        "--eval-results",
        default=None,
        help="held-out metrics: an eval_tad results.json (or the demo's). Default: the demo's results.json if found",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. assets_dir=/x)")
    ns = parser.parse_args(argv)
    out_dir = Path(ns.out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not ns.force:
        what = "a file" if not out_dir.is_dir() else f"a non-empty folder ({len(list(out_dir.iterdir()))} entries)"
        raise FileExistsError(
            f"--out {out_dir} is {what}: exporting there would mix files with what it holds (a run folder?); "
            "give a new or empty folder, or add --force to write into it anyway"
        )

    from omegaconf import OmegaConf

    def fail(message: str) -> int:
        print(f"tad-tune export-hf: {message}", file=sys.stderr)
        return EXIT_REFUSED

    weights = Path(ns.weights)
    if not weights.exists():
        return fail(f"--weights {weights} does not exist")
    cfg_path = Path(ns.config) if ns.config else _default_config(weights)
    if cfg_path is None:
        return fail(f"no --config given and no torchtune_config.yaml in the run folder of {weights}; pass --config")
    from tad_torchtune.config_loader import load_config

    try:  # a path or a shipped name, overrides checked: the loader every command uses
        cfg = load_config(cfg_path, ns.overrides)
    except (FileNotFoundError, ValueError) as err:
        return fail(f"--config: {err}")
    if cfg.get(ns.model_key) is None:
        return fail(f"config {cfg_path} has no {ns.model_key!r} node")
    node = OmegaConf.to_container(cfg[ns.model_key], resolve=True)
    try:
        family, args = resolve(node)
    except ValueError as err:
        return fail(str(err))
    sd = load_weights(weights, family)

    tokenizer, tokenizer_dir = None, ns.tokenizer_dir
    tok_node = OmegaConf.to_container(cfg.tokenizer, resolve=True) if cfg.get("tokenizer") is not None else None
    if not ns.no_tokenizer and tok_node is not None:
        if tokenizer_dir is None:
            found = standalone.tokenizer_source_dir(tok_node)
            tokenizer_dir = str(found) if found is not None else None
        try:
            from torchtune import config as tt_config

            tokenizer = tt_config.instantiate(cfg.tokenizer)
        except Exception as err:  # a missing file etc.: the ids then come from the flags / copied files
            print(f"note: could not build the config's tokenizer ({type(err).__name__}: {err})", file=sys.stderr)
    if ns.no_tokenizer:
        tokenizer_dir = None

    full_cfg = OmegaConf.to_container(cfg, resolve=True)
    facts = standalone.run_facts(full_cfg, weights, Path(ns.eval_results) if ns.eval_results else None)
    for key in ("teacher", "loss", "data", "steps", "tokens"):
        if getattr(ns, key) is not None:
            facts[key] = getattr(ns, key)
    if ns.model_key != "model":
        facts.update(teacher="(this is the teacher)", loss=None, steps=None, tokens=None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[ns.dtype]
    notes: list[str] = []
    try:
        out = export_hf(
            sd,
            family,
            args,
            ns.out,
            tokenizer_dir,
            dtype=dtype,
            bos_token_id=ns.bos_id,
            eos_token_id=ns.eos_id,
            pad_token_id=ns.pad_id,
            tokenizer=None if ns.no_tokenizer and tokenizer is None else tokenizer,
            facts=facts,
            notes=notes,
        )
    except FileNotFoundError as err:
        return fail(str(err))
    if ns.no_tokenizer:
        notes = [n for n in notes if not n.startswith(("no tokenizer", "cannot convert"))]
    have_tok = any((out / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    print(
        f"wrote {out} ({family}, {args['num_layers']} layers; "
        f"{'tokenizer, ' if have_tok else 'NO tokenizer, '}generation_config.json, README.md)"
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
