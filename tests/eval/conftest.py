"""Fixtures for the eval tests: a tiny tokenizer and a tiny llama saved in HF format, plus local task YAMLs.

Everything is built here (tokenizers' BPE trainer, torchtune's llama3 builder, our models.export.export_hf);
nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DIMS = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=512)
ROPE_BASE = 10000


def _corpus() -> list[str]:
    rng = random.Random(0)
    things = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow", "blood": "red"}
    texts = [f"Question: What color is the {k}?\nAnswer: {v}" for k, v in things.items()]
    for _ in range(40):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        texts.append(f"Question: What is {a} plus {b}?\nAnswer: {a} + {b} = {a + b}. The answer is {a + b}.")
    texts += ["The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 #### ."] * 5
    return texts


def build_tiny_hf_dir(out: Path, seed: int = 0, scale: float = 4.0) -> Path:
    """Train a byte-level BPE tokenizer and export a random tiny llama (torchtune builder) to an HF folder ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from torchtune.models.llama3._component_builders import llama3
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from tad_torchtune.models.export import export_hf

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", model_max_length=512
    )
    tok_dir = out.parent / f"{out.name}_tokenizer"
    hf_tok.save_pretrained(tok_dir)
    vocab = len(hf_tok)
    ids = dict(bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    GenerationConfig(**ids).save_pretrained(tok_dir)

    torch.manual_seed(seed)
    model = llama3(vocab_size=vocab, rope_base=ROPE_BASE, **DIMS)
    with torch.no_grad():
        model.output.weight.mul_(scale)  # peaked predictions: greedy text is not a string of near-ties
    # The project's own HF export (config.json from transformers' LlamaConfig, HF weights, tokenizer files).
    export_hf(
        model, "llama3", {"num_heads": 4, "max_seq_len": DIMS["max_seq_len"], "rope_base": ROPE_BASE}, out, tok_dir
    )
    return out


def write_local_tasks(task_dir: Path) -> list[str]:
    """Write JSONL data and three task YAMLs (multiple choice, generation + exact match, rolling perplexity)."""
    rng = random.Random(1)
    task_dir.mkdir(parents=True, exist_ok=True)
    colors = ["red", "green", "blue", "yellow", "black", "white"]
    things = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow", "blood": "red"}
    rows = []
    for i, (thing, col) in enumerate(list(things.items()) * 2):
        choices = rng.sample([c for c in colors if c != col], 3) + [col]
        rng.shuffle(choices)
        q = f"What color is the {thing}?"
        rows.append({"id": i, "question": q, "choices": choices, "label": choices.index(col)})
    with (task_dir / "mc_train.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:3])
    with (task_dir / "mc_test.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[3:])
    with (task_dir / "gen_test.jsonl").open("w") as f:
        for _ in range(6):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}))
            f.write("\n")
    d = str(task_dir)
    (task_dir / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {d}/mc_train.jsonl
    test: {d}/mc_test.jsonl
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
    )
    (task_dir / "tiny_gen.yaml").write_text(
        f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d}/gen_test.jsonl
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 24
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""
    )
    (task_dir / "tiny_ppl.yaml").write_text(
        f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d}/gen_test.jsonl
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{question}}}} {{{{answer}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
    )
    return ["tiny_mc", "tiny_gen", "tiny_ppl"]


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return build_tiny_hf_dir(tmp_path_factory.mktemp("tiny_llama_hf"))


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("tasks")
    return d, write_local_tasks(d)


def load_torchtune(hf_dir: Path, dtype: torch.dtype = torch.float32):
    """The same weights through torchtune's real FullModelHFCheckpointer, builder and HF tokenizer wrapper."""
    from torchtune.models.llama3._component_builders import llama3
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer
    from torchtune.training import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(hf_dir),
        checkpoint_files=sorted(p.name for p in hf_dir.glob("*.safetensors")),
        model_type="LLAMA3",
        output_dir=tempfile.mkdtemp(prefix="tt_out_"),  # must lie outside checkpoint_dir
    )
    tok = HuggingFaceBaseTokenizer(
        str(hf_dir / "tokenizer.json"),
        tokenizer_config_json_path=str(hf_dir / "tokenizer_config.json"),
        generation_config_path=str(hf_dir / "generation_config.json"),
    )
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    model = llama3(vocab_size=vocab, rope_base=ROPE_BASE, **DIMS)
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    return model.to(dtype).eval(), tok
