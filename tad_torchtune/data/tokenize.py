"""``tad-tune tokenize``: pre-tokenise a corpus into a token file for ``packed_token_dataset``.

Examples::

    # 2B tokens of OpenWebMath (local parquet shards) with TinyLlama's (= Llama-2's) tokenizer
    tad-tune tokenize --source /data/open-web-math/data/*.parquet --text-column text \\
        --tokenizer torchtune.models.llama2.llama2_tokenizer --tokenizer-arg path=/models/tinyllama/tokenizer.model \\
        --output /data/owm_llama2.bin --max-tokens 2.5e9 --num-workers 16

    # the tokenizer of a recipe config, a hub dataset (needs network)
    tad-tune tokenize --source sail/regmix-data-sample --tokenizer configs/qwen1.5_1.8b_to_1.2b.yaml \\
        --output /data/regmix_qwen.bin --max-tokens 2e9
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tad_torchtune.data.token_file import write_token_file
from tad_torchtune.data.tokenizer_tools import load_tokenizer
from tad_torchtune.reliability.errors import EXIT_REFUSED


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tad-tune tokenize",
        description="Tokenise a corpus (local json/jsonl/parquet/txt/csv files or a hub dataset id) into a flat "
        "uint16/uint32 token file plus JSON metadata, EOS after every document. Interrupt and rerun to resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    p.add_argument("--source", nargs="+", required=True, help="data files, globs, a directory, or a hub dataset id")
    p.add_argument("--output", required=True, help="token file to write (.bin; metadata goes to .json beside it)")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="dotted torchtune builder (with --tokenizer-arg), an HF tokenizer folder or tokenizer.json file "
        "(--tokenizer-arg eos_id=N / bos_id=N when no tokenizer_config.json states them), or a recipe YAML",
    )
    p.add_argument(
        "--tokenizer-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument for the tokenizer builder, e.g. path=/models/x/tokenizer.model (repeatable)",
    )
    p.add_argument("--text-column", default="text", help="column with the document text (default: text)")
    p.add_argument("--split", default="train")
    p.add_argument("--subset", default=None, help="hub dataset configuration name")
    p.add_argument(
        "--text-sample-by",
        default="paragraph",
        choices=["line", "paragraph", "document"],
        help="what one document is in .txt input (default: paragraph)",
    )
    p.add_argument("--max-tokens", type=float, default=None, help="stop after this many tokens, e.g. 2e9")
    p.add_argument(
        "--num-workers", type=int, default=os.cpu_count() or 1, help="tokeniser processes (default: all cores)"
    )
    p.add_argument("--batch-docs", type=int, default=256, help="documents per work item (default: 256)")
    p.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    p.add_argument("--vocab-size", type=int, default=None, help="override the tokenizer's vocabulary size")
    p.add_argument("--overwrite", action="store_true", help="replace a complete token file made with other settings")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kwargs = {}
    for item in args.tokenizer_arg:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--tokenizer-arg {item!r} is not KEY=VALUE", file=sys.stderr)
            return EXIT_REFUSED
        kwargs[key] = _parse_value(value)
    try:
        tokenizer = load_tokenizer(args.tokenizer, **kwargs)
        meta = _write(args, tokenizer, kwargs)
    except (FileExistsError, FileNotFoundError, ValueError) as err:  # bad input: one line, no traceback
        print(f"tad-tune tokenize: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {args.output} is not complete; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    print(
        f"{args.output}: {meta['num_tokens']:,} tokens ({meta['dtype']}), {meta['num_documents']:,} documents, "
        f"{meta['num_bytes'] / 1e6:.1f} MB of text in {meta['seconds']:.1f} s"
    )
    return 0


def _write(args: argparse.Namespace, tokenizer, kwargs: dict) -> dict:
    source = args.source[0] if len(args.source) == 1 else args.source
    return write_token_file(
        args.output,
        tokenizer,
        source,
        text_column=args.text_column,
        split=args.split,
        subset=args.subset,
        text_sample_by=args.text_sample_by,
        max_tokens=args.max_tokens,
        num_workers=args.num_workers,
        batch_docs=args.batch_docs,
        add_bos=not args.no_bos,
        vocab_size=args.vocab_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tokenizer_spec={"builder": args.tokenizer, **kwargs},
    )


if __name__ == "__main__":
    sys.exit(main())
