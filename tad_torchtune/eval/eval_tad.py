"""The ``eval_tad`` recipe: evaluate a torchtune checkpoint with lm-evaluation-harness, offline-capable.

Launch (all equivalent)::

    tad-tune run eval_tad --config configs/eval_commonsense8.yaml checkpointer.checkpoint_dir=out/epoch_0
    tune run tad_torchtune.eval.eval_tad --config configs/eval_commonsense8.yaml
    python -m tad_torchtune.eval.eval_tad --config configs/eval_commonsense8.yaml

Features:
    - Any checkpoint the distillation recipe writes: the model is built with ``config.instantiate(cfg.model)`` and
      loaded strictly through ``cfg.checkpointer``; CPU or GPU, fp32 or bf16.
    - Our task groups ``commonsense8`` and ``math8`` (``tad_torchtune/eval/tasks``) are always available, plus
      ``include_path`` folders and, with ``include_defaults: true``, every lm-eval task.
    - :class:`~tad_torchtune.eval.lm.TorchtuneLM`: log-likelihood, rolling log-likelihood and greedy generation
      with a KV cache; no HFLM, no hub.
    - Writes ``results.json`` (lm-eval's output, plus Full-ECE when ``full_ece.text`` is set), ``results.md``
      (the paper's table; ``Rel`` against ``baseline_results`` when given) and per-sample logs on request.

Limits:
    - Single process (no data parallel); greedy decoding only (the paper's protocol).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.recipe_interfaces import EvalRecipeInterface

from tad_torchtune.eval import loading

TASKS_DIR = Path(__file__).parent / "tasks"
log = utils.get_logger("INFO")


# Every top-level key this recipe reads (configs/eval_*.yaml); anything else is a typo, refused with a suggestion.
EVAL_KEYS = frozenset(
    """
    add_bos baseline_name baseline_results batch_size checkpointer device dtype enable_kv_cache full_ece
    include_defaults include_path limit log_samples math_data_dir max_gen_toks max_seq_len model num_fewshot
    output_dir run_name seed storycloze_dir table_metrics tasks tokenizer
    """.split()
)


def _check_keys(cfg: DictConfig) -> None:
    """Refuses unknown top-level keys (e.g. ``taks=``), which would otherwise leave the defaults in force."""
    import difflib
    import re

    referenced = set(re.findall(r"\$\{([A-Za-z_]\w*)", OmegaConf.to_yaml(cfg)))
    unknown = [str(k) for k in cfg.keys() if str(k) not in EVAL_KEYS and str(k) not in referenced]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(EVAL_KEYS), n=1, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown config key(s) {', '.join(hints)}: the eval recipe never reads them; fix the spelling "
            f"(keys: {', '.join(sorted(EVAL_KEYS))})"
        )


class TADEvalRecipe(EvalRecipeInterface):
    """Evaluate one checkpoint on lm-eval tasks and write JSON + Markdown results.

    Args:
        cfg (DictConfig): the recipe config (see ``configs/eval_commonsense8.yaml`` for every key).
    """

    def __init__(self, cfg: DictConfig) -> None:
        _check_keys(cfg)
        self.cfg = cfg
        self.device, self.dtype = loading.resolve_device_dtype(cfg.get("device"), cfg.get("dtype", "fp32"))
        self.seed = training.set_seed(seed=cfg.get("seed", 1234))
        self.output_dir = Path(cfg.output_dir)
        tasks = cfg.get("tasks")
        if not tasks:
            raise ValueError("config key 'tasks' is empty: give task or group names, e.g. tasks: [commonsense8]")
        self.tasks = [tasks] if isinstance(tasks, str) else list(tasks)

    def load_checkpoint(self, **kwargs) -> None:
        """Checkpoint loading happens in :meth:`setup` through ``cfg.checkpointer``."""

    def setup(self, cfg: DictConfig | None = None) -> None:
        """Build the model, tokenizer, lm-eval wrapper and task manager."""
        cfg = cfg or self.cfg
        t0 = time.perf_counter()
        self.model = loading.build_model(cfg, "model", "checkpointer", self.device, self.dtype)
        self.tokenizer = loading.build_tokenizer(cfg)
        log.info(f"model and tokenizer ready in {time.perf_counter() - t0:.1f}s ({self.dtype}, {self.device})")

        from lm_eval.tasks import TaskManager

        from tad_torchtune.eval.lm import TorchtuneLM

        self.lm = TorchtuneLM(
            self.model,
            self.tokenizer,
            device=self.device,
            batch_size=cfg.get("batch_size", 8),
            max_seq_len=cfg.get("max_seq_len"),
            max_gen_toks=cfg.get("max_gen_toks", 256),
            enable_kv_cache=cfg.get("enable_kv_cache", True),
            add_bos=cfg.get("add_bos"),
        )
        include = [str(TASKS_DIR)] + [str(Path(p)) for p in (cfg.get("include_path") or [])]
        metadata = {k: cfg.get(k) for k in ("storycloze_dir", "math_data_dir") if cfg.get(k) is not None}
        self.task_manager = TaskManager(
            include_path=include, include_defaults=cfg.get("include_defaults", True), metadata=metadata or None
        )
        unknown = [t for t in self.tasks if t not in self.task_manager.task_index]
        if unknown:
            raise ValueError(
                f"unknown task(s) {unknown}; add their YAML folder to include_path "
                f"(include_defaults={cfg.get('include_defaults', True)})"
            )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Run lm-eval, optionally Full-ECE, and write ``results.json`` and ``results.md``."""
        from lm_eval import simple_evaluate

        cfg = self.cfg
        t0 = time.perf_counter()
        from tad_torchtune._quiet import quiet_git_hash

        with quiet_git_hash():
            out = simple_evaluate(
                model=self.lm,
                tasks=self.tasks,
                num_fewshot=cfg.get("num_fewshot"),
                limit=cfg.get("limit"),
                task_manager=self.task_manager,
                log_samples=cfg.get("log_samples", False),
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        log.info(f"lm-eval finished in {time.perf_counter() - t0:.1f}s")
        out = dict(out)
        extra: dict[str, float] = {}
        ece_cfg = cfg.get("full_ece")
        if ece_cfg is not None and ece_cfg.get("text"):
            from tad_torchtune.eval.full_ece import full_ece_of_model

            batches = loading.heldout_batches(
                self.tokenizer,
                ece_cfg.text,
                ece_cfg.get("seq_len", 1024),
                ece_cfg.get("batch_size", 4),
                ece_cfg.get("max_batches"),
            )
            ece = full_ece_of_model(self.model, batches, n_bins=ece_cfg.get("n_bins", 10))
            out["full_ece"] = {k: v for k, v in ece.items() if not k.startswith("bins_")} | {
                "bins_hits": ece["bins_hits"],
                "bins_mass": ece["bins_mass"],
            }
            extra["F-ECE"] = 100 * ece["full_ece"]  # the paper reports Full-ECE in percent (1.45 -> 1.19)
            log.info(f"Full-ECE = {ece['full_ece']:.5f} over {ece['num_tokens']} tokens")
        return self._write(out, extra)

    def _write(self, out: dict, extra: dict[str, float]) -> dict:
        from tad_torchtune.eval.report import load_results, markdown_table

        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        samples = out.pop("samples", None)
        out["tad_eval_config"] = OmegaConf.to_container(cfg, resolve=True)
        (self.output_dir / "results.json").write_text(json.dumps(out, indent=2, default=str))
        if samples is not None:
            for task, rows in samples.items():
                with (self.output_dir / f"samples_{task}.jsonl").open("w") as f:
                    for r in rows:
                        f.write(json.dumps(r, default=str) + "\n")
        name = cfg.get("run_name", "student")
        runs = {name: out}
        extras = {name: extra} if extra else None
        baseline_name = None
        if cfg.get("baseline_results"):
            baseline_name = cfg.get("baseline_name", "vanilla KD")
            base = load_results(cfg.baseline_results)
            runs = {baseline_name: base, name: out}
            if extra and "full_ece" in base:
                extras = {name: extra, baseline_name: {"F-ECE": 100 * base["full_ece"]["full_ece"]}}
        metrics = OmegaConf.to_container(cfg.table_metrics) if cfg.get("table_metrics") else None
        table = markdown_table(runs, self.tasks, baseline=baseline_name, metrics=metrics, extra=extras)
        (self.output_dir / "results.md").write_text(table)
        log.info(f"wrote {self.output_dir / 'results.json'} and {self.output_dir / 'results.md'}\n{table}")
        return out

    def cleanup(self) -> None:
        del self.model


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point for ``tune run`` / ``tad-tune run eval_tad`` / ``python -m``."""
    recipe = TADEvalRecipe(cfg)
    recipe.setup(cfg)
    recipe.evaluate()
    recipe.cleanup()


def main() -> int:
    """``python -m``/``tune run`` entry: a refused input is one line and exit code 1 (``--debug``: traceback)."""
    from tad_torchtune.reliability.errors import debug_requested, run_reporting

    debug, sys.argv = debug_requested(sys.argv)
    return run_reporting(recipe_main, "eval_tad", debug)


if __name__ == "__main__":
    sys.exit(main())
