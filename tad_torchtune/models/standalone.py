"""What an exported model directory needs besides weights and ``config.json`` to stand alone: the tokenizer it
was trained with, its special ids, and a model card saying how it was made.

Used by :func:`tad_torchtune.models.export.export_hf` and ``tad-tune export-hf``; nothing here depends on the
architecture.

Tokenizer sources, in order:

1. an HF tokenizer folder or a ``tokenizer.json`` file given by the user (``--tokenizer-dir``);
2. the files the training config's ``tokenizer`` node points at, when their folder (or its parent) holds HF
   tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``), e.g. ``path: /models/Qwen/vocab.json``;
3. the instantiated training tokenizer: one built on a ``tokenizers.Tokenizer`` (the demo's SmolLM2 tokenizer,
   torchtune's ``HuggingFaceBaseTokenizer``) is saved as is; our offline :class:`ByteTokenizer` is written
   as an equivalent byte-level ``tokenizer.json`` (same ids for every string, tested).

Run facts for the model card come from the run folder (``output_dir``): ``torchtune_config.yaml`` (teacher,
loss, data), the metric logger's ``logs/log_*.txt`` (steps, tokens), and a results file (held-out metrics)
when one is given or found.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tad_torchtune.recipe_settings import loss_weights

__all__ = [
    "TOKENIZER_FILES",
    "byte_level_hf_tokenizer",
    "copy_tokenizer_files",
    "tokenizer_source_dir",
    "write_tokenizer",
    "finish_tokenizer_config",
    "special_ids",
    "run_facts",
    "model_card",
]

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
# Files that make a folder an HF tokenizer folder (vocab.json/merges.txt alone are not loadable by AutoTokenizer).
_HF_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_hf_tokenizer(bos: str = "<bos>", eos: str = "<eos>", pad: str = "<pad>"):
    """A ``tokenizers.Tokenizer`` with the ids of :class:`tad_torchtune.data.byte_tokenizer.ByteTokenizer`:
    byte ``b`` is id ``b`` (0-255), then ``bos``, ``eos``, ``pad`` (256, 257, 258).

    Byte-level BPE with no merges over GPT-2's byte alphabet, no regex split, so every UTF-8 byte is one token
    and decoding restores the text. It adds no special tokens by itself (as ``ByteTokenizer.encode`` with
    ``add_bos=False, add_eos=False``); the names of the three special tokens are recognised in the text.

    Returns:
        tokenizers.Tokenizer: vocabulary of 259.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([bos, eos, pad])
    return tok


def copy_tokenizer_files(source: Path, out_dir: Path) -> list[str]:
    """Copy HF tokenizer files from a folder (or one ``tokenizer.json``-like file) into ``out_dir``.

    ``tokenizer_class: TokenizersBackend`` (written by transformers 5) becomes ``PreTrainedTokenizerFast`` so
    transformers 4 loads the folder too.

    Returns:
        list[str]: the names copied.

    Raises:
        FileNotFoundError: when ``source`` holds none of :data:`TOKENIZER_FILES`.
    """
    source = Path(source)
    if source.is_file():
        if source.suffix != ".json":
            raise FileNotFoundError(
                f"--tokenizer-dir {source}: a single file must be an HF tokenizer.json; give the folder for "
                f"other formats ({', '.join(TOKENIZER_FILES)})"
            )
        shutil.copyfile(source, out_dir / "tokenizer.json")
        copied = ["tokenizer.json"]
    elif source.is_dir():
        copied = []
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out_dir / name)
                copied.append(name)
    else:
        raise FileNotFoundError(f"tokenizer source {source} does not exist")
    if not copied:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source}")
    tc = out_dir / "tokenizer_config.json"
    if tc.is_file():
        data = json.loads(tc.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            tc.write_text(json.dumps(data, indent=2))
    return copied


def tokenizer_source_dir(node: Mapping[str, Any]) -> Path | None:
    """The HF tokenizer folder a config's ``tokenizer`` node reads from, if any.

    Every string value that names an existing file or folder is a candidate; its folder, or that folder's parent
    (torchtune's Llama-3 tokenizer reads ``original/tokenizer.model``), counts when it holds ``tokenizer.json``
    or ``tokenizer_config.json``.
    """
    for key, value in node.items():
        if key == "_component_" or not isinstance(value, str):
            continue
        p = Path(value).expanduser()
        if not p.exists():
            continue
        base = p if p.is_dir() else p.parent
        for d in (base, base.parent):
            if any((d / m).is_file() for m in _HF_MARKERS):
                return d
    return None


def write_tokenizer(tokenizer: Any, out_dir: Path) -> str | None:
    """Write an instantiated training tokenizer as ``out_dir/tokenizer.json`` when it can be.

    Returns:
        str | None: a short description of what was written, or None when this tokenizer type cannot be
        converted (the caller then asks for ``--tokenizer-dir``).
    """
    from tokenizers import Tokenizer

    from tad_torchtune.data.byte_tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        byte_level_hf_tokenizer().save(str(out_dir / "tokenizer.json"))
        return "byte-level tokenizer.json equivalent to ByteTokenizer"
    inner = getattr(tokenizer, "tokenizer", None)
    if isinstance(inner, Tokenizer):
        inner.save(str(out_dir / "tokenizer.json"))
        return f"tokenizer.json of {type(tokenizer).__name__}"
    return None


def special_ids(tokenizer: Any) -> dict[str, Any]:
    """BOS / EOS / PAD ids (and stop ids) an instantiated torchtune tokenizer states (absent ones left out)."""
    out: dict[str, Any] = {}
    for key, attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            out[key] = value
    stops = [int(t) for t in (getattr(tokenizer, "stop_tokens", None) or [])]
    if stops and "eos_token_id" in out:
        # generation stops at any of them; the first is the model's EOS
        out["stop_token_ids"] = [out["eos_token_id"]] + [t for t in stops if t != out["eos_token_id"]]
    return out


def finish_tokenizer_config(
    out_dir: Path, bos: int | None, eos: int | None, pad: int | None, max_len: int
) -> str | None:
    """Make ``tokenizer_config.json`` name the special tokens, writing a minimal one next to a bare
    ``tokenizer.json`` (the form ``AutoTokenizer`` loads as ``PreTrainedTokenizerFast``).

    Values already in a copied ``tokenizer_config.json`` are kept.

    Returns:
        str | None: a note when ``tokenizer.json`` cannot be read (the token names are then not written).
    """
    tj, tc = out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"
    if not tj.is_file() and not tc.is_file():
        return None
    data = json.loads(tc.read_text()) if tc.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    note = None
    if tj.is_file():
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(tj))
        except Exception as err:  # the tokenizers library's own parse error
            vocab = None
            note = f"{tj.name} cannot be read by the tokenizers library ({err}); AutoTokenizer will fail on it"
        for key, tid in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)):
            if vocab is None:
                break
            if tid is not None and data.get(key) is None:
                name = vocab.id_to_token(int(tid))
                if name is not None:
                    data[key] = name
    data.setdefault("model_max_length", int(max_len))
    tc.write_text(json.dumps(data, indent=2))
    return note


# ------------------------------------------------------------------------------------------ run facts and card
_STEP_LINE = re.compile(r"^Step (\d+) \| (.*)$")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _dims(node: Mapping[str, Any]) -> str:
    """`` (llama3, 30 layers, dim 576)`` for a model node, or "" when its builder is unknown."""
    try:
        from tad_torchtune.models.registry import resolve

        family, args = resolve(dict(node))
        return f" ({family}, {args['num_layers']} layers, dim {args['embed_dim']})"
    except Exception:  # an unknown builder: the component path alone
        return ""


def _read_disk_logs(log_dir: Path) -> dict[int, dict[str, float]]:
    """``Step N | key:value ...`` lines of torchtune's DiskLogger; a resumed run's repeated steps keep the last."""
    steps: dict[int, dict[str, float]] = {}
    for path in sorted(log_dir.glob("log_*.txt"), key=lambda p: p.stat().st_mtime):
        for line in path.read_text(errors="replace").splitlines():
            m = _STEP_LINE.match(line.strip())
            if not m:
                continue
            row = {}
            for item in m.group(2).split():
                key, _, value = item.partition(":")
                try:
                    row[key] = float(value)
                except ValueError:
                    continue
            steps[int(m.group(1))] = row
    return steps


def _find_up(start: Path, name: str, levels: int = 2) -> Path | None:
    d = start if start.is_dir() else start.parent
    for _ in range(levels + 1):
        if (d / name).is_file():
            return d / name
        d = d.parent
    return None


def find_run_config(weights: Path) -> Path | None:
    """``torchtune_config.yaml`` of the run that wrote ``weights`` (``output_dir/epoch_N`` -> ``output_dir``)."""
    return _find_up(Path(weights), "torchtune_config.yaml")


def _heldout_from_results(path: Path, run_name: str | None) -> dict[str, float] | None:
    """Metrics from an ``eval_tad`` / lm-eval ``results.json`` or the demo's ``results.json``."""
    data = json.loads(path.read_text())
    if "runs" in data:  # the demo: one entry per loss
        for run in data["runs"]:
            if run_name is None or run["name"].lower() == run_name.lower():
                return {
                    f"held-out {k}": float(v) for k, v in run.get("final", {}).items() if isinstance(v, int | float)
                }
        return None
    out: dict[str, float] = {}
    for task, metrics in (data.get("results") or {}).items():
        for key, value in metrics.items():
            if isinstance(value, int | float) and "stderr" not in key and key not in ("alias", "sample_len"):
                out[f"{task} {key.split(',')[0]}"] = float(value)
    if "full_ece" in data and isinstance(data["full_ece"], dict):
        out["Full-ECE"] = float(data["full_ece"]["full_ece"])
    return out or None


def run_facts(cfg: Mapping[str, Any] | None, weights: Path | None, results: Path | None = None) -> dict[str, Any]:
    """What is known about how the exported model was trained.

    Args:
        cfg (Mapping | None): the resolved training config (``torchtune_config.yaml``), if known.
        weights (Path | None): the exported weights (their run folder holds the logs).
        results (Path | None): a results file with held-out metrics; None looks for the demo's ``results.json``
            two folders above the run folder (``OUT/runs/tad/epoch_0`` -> ``OUT/results.json``).

    Returns:
        dict: keys ``teacher``, ``loss``, ``data``, ``steps``, ``tokens``, ``heldout``; a value is None when
        it cannot be known.
    """
    facts: dict[str, Any] = dict.fromkeys(("teacher", "loss", "data", "steps", "tokens", "heldout"))
    run_dir = None
    if weights is not None:
        cfg_path = find_run_config(weights)
        run_dir = cfg_path.parent if cfg_path is not None else Path(weights).parent
    if cfg:
        t = cfg.get("teacher_model")
        if t:
            ck = (cfg.get("teacher_checkpointer") or {}).get("checkpoint_dir")
            facts["teacher"] = f"`{t.get('_component_')}`" + _dims(t) + (f", weights `{ck}`" if ck else "")
        kd = cfg.get("kd_loss")
        parts = []
        ce_weight, kd_weight = loss_weights(OmegaConf.create(dict(cfg)))  # torchtune's kd_ratio applied
        if kd:
            args = ", ".join(f"{k}={v}" for k, v in kd.items() if k in ("top_k", "beta", "temperature", "alpha"))
            parts.append(f"{kd_weight} x `{kd.get('_component_')}`" + (f" ({args})" if args else ""))
        if ce_weight:
            parts.append(f"{ce_weight} x cross-entropy")
        if cfg.get("cosine_weight"):
            parts.append(f"{cfg.get('cosine_weight')} x hidden-state cosine")
        facts["loss"] = " + ".join(parts) or None
        ds = cfg.get("dataset")
        if ds:
            nodes = ds if isinstance(ds, list) else [ds]
            desc = []
            for n in nodes:
                keys = ("source", "data_files", "path", "split", "column", "seq_len", "subset")
                extra = ", ".join(f"{k}={n[k]}" for k in keys if n.get(k) is not None)
                desc.append(f"`{n.get('_component_')}`" + (f" ({extra})" if extra else ""))
            facts["data"] = "; ".join(desc)
    if run_dir is not None:
        log_dir = Path((cfg or {}).get("metric_logger", {}).get("log_dir") or run_dir / "logs")
        steps = _read_disk_logs(log_dir) if log_dir.is_dir() else {}
        if steps:
            facts["steps"] = max(steps)
            if all("num_tokens" in r for r in steps.values()):
                facts["tokens"] = int(sum(r["num_tokens"] for r in steps.values()))
        else:  # another metric logger: the last step checkpoint's number is still the step count
            done = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("step_*") if (m := _STEP_DIR.match(p.name))]
            facts["steps"] = max(done) if done else None
    if results is None and run_dir is not None and (run_dir.parent.parent / "results.json").is_file():
        results = run_dir.parent.parent / "results.json"
    if results is not None:
        facts["heldout"] = _heldout_from_results(Path(results), run_dir.name if run_dir is not None else None)
    return facts


_FACT_FLAGS = {
    "teacher": "--teacher",
    "loss": "--loss",
    "data": "--data",
    "steps": "--steps",
    "tokens": "--tokens",
    "heldout": "--eval-results",
}


def unknown_facts(facts: Mapping[str, Any]) -> list[str]:
    """``'steps (--steps)'``-style names of the facts the card cannot state."""
    return [f"{k} ({_FACT_FLAGS[k]})" for k in _FACT_FLAGS if facts.get(k) in (None, "", {})]


def model_card(
    facts: Mapping[str, Any], *, architecture: str, family: str, num_layers: int, num_params: int, ids: Mapping
) -> str:
    """The exported directory's ``README.md``: HF front matter, how the model was trained, what is unknown."""

    def show(key: str) -> str:
        value = facts.get(key)
        if value in (None, "", {}):
            return f"not recorded (pass `{_FACT_FLAGS[key]}` to `tad-tune export-hf`)"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [distillation, tail-aware-distillation, tad_torchtune]",
        "---",
        "",
        "# Distilled student (tad_torchtune)",
        "",
        f"A `{architecture}` ({family} family, {num_layers} layers, {num_params / 1e6:.2f}M parameters) trained by "
        "knowledge distillation with [tad_torchtune](https://arxiv.org/abs/2602.20816) and exported by "
        "`tad-tune export-hf`. Load it with `AutoModelForCausalLM` / `AutoTokenizer`, or evaluate it with "
        "`lm_eval --model hf --model_args pretrained=<this folder>`.",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {show('teacher')} |",
        f"| loss | {show('loss')} |",
        f"| data | {show('data')} |",
        f"| optimizer steps | {show('steps')} |",
        f"| training tokens | {show('tokens')} |",
        "| special ids | " + ", ".join(f"{k}={v}" for k, v in ids.items()) + " |",
        "",
        "## Held-out metrics",
        "",
    ]
    held = facts.get("heldout")
    if held:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in held.items()]
    else:
        lines.append(show("heldout"))
    return "\n".join(lines) + "\n"
