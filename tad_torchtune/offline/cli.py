"""``tad-tune offline score | select | generate``: run the teacher once over a corpus (docs/offline.md).

Each verb builds the models from a recipe config (``--config``, with ``key=value`` overrides), checks the inputs
before any compute, and runs :func:`~tad_torchtune.offline.engine.run_pass`; under ``torchrun`` every process
takes its own shards (``torchrun --nproc_per_node 8 -m tad_torchtune.cli offline score ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

_VERBS = {
    "score": "MiniPLM: score every window with the teacher and a reference model (log-ratio per token)",
    "select": "MiniPLM: keep the top fraction of scored windows as a new token file the recipe reads",
    "generate": "Seq-KD: the teacher continues prompts (ORCAMEL questions or window prefixes)",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe config (path or shipped name) with the teacher")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. assets_dir=/data/x)")
    p.add_argument("--out", required=True, help="output folder of the pass (shards + manifest.json)")
    p.add_argument("--teacher-key", default="teacher_model", help="config section of the model. Default: %(default)s")
    p.add_argument(
        "--teacher-checkpointer-key",
        default="teacher_checkpointer",
        help="config section with its weights. Default: %(default)s",
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="Default: %(default)s")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N. Default: cuda:LOCAL_RANK if any, else cpu")
    p.add_argument("--batch-size", type=int, default=8, help="instances per model call. Default: %(default)s")
    p.add_argument("--shard-size", type=int, default=1024, help="instances per shard file. Default: %(default)s")
    p.add_argument("--overwrite", action="store_true", help="start again in a folder that holds another pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _windows(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, help="token file (.bin) written by `tad-tune tokenize`")
    p.add_argument("--max-seq-len", type=int, default=None, help="window length L (the recipe's max_seq_len)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first N windows. Default: all")


def build_parser(verb: str) -> argparse.ArgumentParser:
    """The parser of one verb (``score``, ``select`` or ``generate``)."""
    p = argparse.ArgumentParser(prog=f"tad-tune offline {verb}", description=_VERBS[verb] + " (docs/offline.md)")
    if verb == "score":
        _common(p)
        _windows(p, required=True)
        p.add_argument("--reference-config", default=None, help="config holding the reference model. Default: --config")
        p.add_argument("--reference-key", default="reference_model", help="its model section. Default: %(default)s")
        p.add_argument(
            "--reference-checkpointer-key",
            default="reference_checkpointer",
            help="its weights section. Default: %(default)s",
        )
    elif verb == "select":
        p.add_argument("--scores", required=True, help="folder of a finished `offline score` pass")
        p.add_argument("--output", required=True, help="new token file (.bin)")
        p.add_argument("--fraction", type=float, default=0.5, help="kept fraction. Default: %(default)s (MiniPLM's)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    else:
        _common(p)
        _windows(p, required=False)
        p.add_argument("--prefix-len", type=int, default=None, help="with --data: prompt = first N ids of each window")
        p.add_argument("--orca", default=None, help="ORCAMEL prompts: Orca-Math file(s)/folder (question column)")
        p.add_argument("--camel", default=None, help="ORCAMEL prompts: CAMEL math folder (message_1 column)")
        p.add_argument("--max-examples", type=int, default=None, help="rows per ORCAMEL source. Default: all")
        p.add_argument("--max-prompt-tokens", type=int, default=None, help="keep the last N prompt ids. Default: all")
        p.add_argument("--max-new-tokens", type=int, required=True, help="most generated tokens per prompt")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
        p.add_argument("--top-k", type=int, default=None, help="sample among the top-k ids. Default: all")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt). Default: %(default)s")
        p.add_argument(
            "--stop-ids",
            type=int,
            nargs="+",
            default=[],
            help="extra stop ids, e.g. the teacher's end-of-turn (Phi-3: 32007 32000); stored as the tokenizer's EOS",
        )
    return p


def _usage() -> str:
    lines = ["usage: tad-tune offline {score,select,generate} [args]  (each verb has --help)", ""]
    lines.append("Run the teacher once over a corpus, sharded over torchrun processes, resumable (docs/offline.md).")
    lines.append("")
    lines += [f"  {verb:<9} {text}" for verb, text in _VERBS.items()]
    return "\n".join(lines)


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _max_seq_len(args: argparse.Namespace, cfg: Any) -> int:
    if args.max_seq_len is not None:
        return int(args.max_seq_len)
    from_cfg = (cfg.get("dataset") or {}).get("max_seq_len") if cfg is not None else None
    if from_cfg is None:
        raise ValueError("give --max-seq-len (the config's dataset has no max_seq_len to take it from)")
    return int(from_cfg)


def _check_corpus(src: Any, tokenizer: Any, vocabs: dict[str, int]) -> None:
    """Refuse a token file made with another tokenizer or holding ids a model cannot read (before any compute)."""
    from tad_torchtune.data import tokenizer_tools as tk

    meta = src.meta
    if tokenizer is not None and meta["tokenizer"]["fingerprint"] != tk.fingerprint(tokenizer):
        raise ValueError(
            f"token file {src.path} was written with {meta['tokenizer']['name']}, which splits text differently "
            f"from the config's tokenizer {tk.describe(tokenizer)}; re-tokenise it with the config's tokenizer"
        )
    for name, vocab in vocabs.items():
        if meta.get("max_id", -1) >= vocab:
            raise ValueError(
                f"token file {src.path} holds id {meta['max_id']} but the {name} has {vocab} ids; "
                "it was tokenised for another model"
            )


def _score(args: argparse.Namespace) -> int:
    from tad_torchtune.config_loader import load_config
    from tad_torchtune.offline.engine import WindowSource
    from tad_torchtune.offline.miniplm import DifferenceScoreWriter
    from tad_torchtune.offline.models import load_model, load_tokenizer, model_vocab

    _check_positive(args, "batch_size", "shard_size", "max_windows", "max_seq_len")
    cfg = load_config(args.config, args.overrides)
    ref_cfg = load_config(args.reference_config, args.overrides) if args.reference_config else cfg
    if cfg.get(args.teacher_key) is None:
        raise ValueError(f"--config has no {args.teacher_key!r} section; name the teacher's section with --teacher-key")
    if ref_cfg.get(args.reference_key) is None:
        where = "--reference-config" if args.reference_config else "--config (no --reference-config given)"
        raise ValueError(
            f"{where} has no {args.reference_key!r} section for the reference model; give --reference-config "
            "FILE (e.g. configs/offline/miniplm_reference_qwen_104m.yaml) or name its sections with "
            "--reference-key and --reference-checkpointer-key"
        )
    src = WindowSource(args.data, _max_seq_len(args, cfg), max_windows=args.max_windows)
    tokenizer = load_tokenizer(cfg) if cfg.get("tokenizer") is not None else None
    teacher = load_model(cfg, args.teacher_key, args.teacher_checkpointer_key, device=args.device, dtype=args.dtype)
    ref = load_model(ref_cfg, args.reference_key, args.reference_checkpointer_key, device=args.device, dtype=args.dtype)
    _check_corpus(src, tokenizer, {"teacher": model_vocab(teacher.model), "reference": model_vocab(ref.model)})
    return _run_and_report(src, DifferenceScoreWriter(teacher, ref), args, teacher)


def _select(args: argparse.Namespace) -> int:
    from tad_torchtune.offline.miniplm import write_selected_token_file

    meta = write_selected_token_file(args.scores, args.output, fraction=args.fraction, overwrite=args.overwrite)
    src = meta["source"]
    print(
        f"kept {src['num_windows_kept']} of {src['num_windows_scored']} windows ({meta['num_tokens']} tokens) "
        f"in {args.output}; train on it with dataset.path={args.output} dataset.max_seq_len={src['max_seq_len']}"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from tad_torchtune.config_loader import load_config
    from tad_torchtune.data import tokenizer_tools as tk
    from tad_torchtune.offline.engine import PromptSource, WindowSource
    from tad_torchtune.offline.models import load_model, load_tokenizer, model_vocab
    from tad_torchtune.offline.seqkd import SeqKDWriter, orcamel_prompts, stop_ids_of

    _check_positive(args, "batch_size", "shard_size", "max_windows", "max_new_tokens", "prefix_len", "top_k")
    _check_positive(args, "max_examples", "max_prompt_tokens", "max_seq_len")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    orca = args.orca is not None or args.camel is not None
    if orca == (args.data is not None):
        raise ValueError("give the prompts either as --data FILE.bin --prefix-len N or as --orca/--camel, not both")
    if args.data is not None and args.prefix_len is None:
        raise ValueError("--data needs --prefix-len: how many ids of each window form the prompt")
    cfg = load_config(args.config, args.overrides)
    if cfg.get(args.teacher_key) is None:
        raise ValueError(f"--config has no {args.teacher_key!r} section; name the model section with --teacher-key")
    if cfg.get("tokenizer") is None:
        raise ValueError("--config has no 'tokenizer' section: generation needs its stop tokens")
    tokenizer = load_tokenizer(cfg)
    if orca:
        sources = []
        if args.orca is not None:
            sources.append((args.orca, "question", "answer"))
        if args.camel is not None:
            sources.append((args.camel, "message_1", "message_2"))
        prompts, desc = orcamel_prompts(tokenizer, sources, max_examples=args.max_examples)
        src: Any = PromptSource(prompts, desc, tokenizer_fingerprint=tk.fingerprint(tokenizer))
    else:
        src = WindowSource(args.data, _max_seq_len(args, cfg), max_windows=args.max_windows, prefix_len=args.prefix_len)
    teacher = load_model(cfg, args.teacher_key, args.teacher_checkpointer_key, device=args.device, dtype=args.dtype)
    if not orca:
        _check_corpus(src, tokenizer, {"teacher": model_vocab(teacher.model)})
    writer = SeqKDWriter(
        teacher,
        max_new_tokens=args.max_new_tokens,
        stop_ids=stop_ids_of(tokenizer) + [i for i in args.stop_ids if i not in stop_ids_of(tokenizer)],
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        max_prompt_tokens=args.max_prompt_tokens,
        vocab_size=tk.vocab_size(tokenizer),
        end_id=tk.eos_id(tokenizer),
    )
    return _run_and_report(src, writer, args, teacher)


def _run_and_report(src: Any, writer: Any, args: argparse.Namespace, model: Any) -> int:
    """The shared pass with the command's flags, on the model's device; prints where the result is."""
    from tad_torchtune.offline.engine import run_pass

    manifest = run_pass(
        src,
        writer,
        args.out,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=next(model.model.parameters()).device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    _report(manifest, args.out)
    return 0


def _report(manifest: dict[str, Any], out: str | Path) -> None:
    state = "complete" if manifest["complete"] else "this process's shards done (other ranks still running?)"
    n = manifest["identity"]["num_instances"]
    print(f"{manifest['identity']['writer']}: {n} instances in {manifest['num_shards']} shards in {out}: {state}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb = argv[0]
    if verb not in _VERBS:
        raise ValueError(f"unknown offline command {verb!r}; choose one of {', '.join(_VERBS)} (--help)")
    args = build_parser(verb).parse_intermixed_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return {"score": _score, "select": _select, "generate": _generate}[verb](args)


if __name__ == "__main__":
    sys.exit(main())
