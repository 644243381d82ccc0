"""``knowledge_distillation_tad``: full-parameter distillation of a student from a frozen teacher.

One file for one process and for N processes. Launched plainly (``python``, ``tune run``) it trains on
one device; under ``torchrun --nproc_per_node N`` it shards the student and the teacher with FSDP2
(``fully_shard``; NCCL on CUDA, gloo on CPU).

Per optimizer step (``gradient_accumulation_steps`` micro-batches per rank)::

    N = valid next-token positions of the whole step, summed over micro-batches and ranks
    loss = (ce_weight·ΣCE + kd_weight·ΣKD + cosine_weight·Σ(1 − cos(h_S, h_T))) / N

Every term is a *sum* over valid tokens divided once by ``N``, so the gradient does not depend on how the
global batch is split into micro-batches or ranks. With ``ce_weight = kd_weight = 1`` this is the paper's
``CE + L_DIV`` (arXiv 2602.20816, Eq. 4 with ``kd_loss: tad_torchtune.TADLoss``).

Two loss paths compute these sums (``fused_loss``): by default, for TAD and forward KL, the *fused* path
(``tad_torchtune.losses.fused_linear``) takes both models' final hidden states and output weights and walks
token slices, so no ``[B, S, V]`` logits exist; otherwise (``fused_loss: false``, other divergences, CE-only
runs) both models emit ``num_output_chunks`` logit chunks. Both give the same losses and gradients.

Usage::

    tune run tad_torchtune.recipes.kd_tad --config configs/tiny_cpu.yaml assets_dir=/tmp/tiny
    tune run --nproc_per_node 2 tad_torchtune.recipes.kd_tad --config configs/tiny_cpu.yaml ...
    tad-tune run knowledge_distillation_tad --config tiny_cpu ...

See ``docs/recipe.md`` for every config key.
"""

from __future__ import annotations

# isort: off
import tad_torchtune  # noqa: F401  first: its dependency-noise filters must precede torchtune's torchao import

# isort: on
import os
import resource
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import ConcatDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.data import padded_collate_packed
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from tad_torchtune.checkpoint.manifest import read_run_record, remove_stale_partials
from tad_torchtune.checkpoint.steps import (
    find_latest_checkpoint,
    load_step_checkpoint,
    rng_state,
    save_step_checkpoint,
    set_rng_state,
)
from tad_torchtune.losses.fused_linear import (
    FusedLinearDistillationLoss,
    fused_distillation_loss,
)
from tad_torchtune.losses.sparse_teacher import SparseTeacher, SparseTeacherLoss
from tad_torchtune.losses.tad import TADLoss
from tad_torchtune.offline import teacher_cache as tcache
from tad_torchtune.planning.flops import FlopsPerToken, measure_matmul_peak
from tad_torchtune.recipe_settings import RecipeSettings
from tad_torchtune.reliability.errors import debug_requested, run_reporting
from tad_torchtune.reliability.guards import NonFiniteError, NonFiniteGuard, first_nonfinite
from tad_torchtune.reliability.run_identity import ParentWatch, RunLock, new_run_id, run_record
from tad_torchtune.training.loss_path import fused_blocker
from tad_torchtune.training.on_policy import OnPolicy
from tad_torchtune.training.outputs import (
    HiddenStateCapture,
    cosine_distance_sum,
    non_empty,
    use_tensor_split_output,
)
from tad_torchtune.validate import validate_or_raise

log = utils.get_logger("INFO")


def _finite_probe(chunks: list[torch.Tensor]) -> torch.Tensor:
    """0-d fp32 sum of every logit, for the non-finite guard: finite iff every logit is finite.

    NaN and ±inf propagate through a sum (``inf - inf`` is NaN); a sum of finite values only overflows past
    3.4e38, i.e. for logits averaging above ~1e30, which is no healthier. One read of the logits, where
    ``isfinite(x).all()`` makes several passes and a bool temporary: ~20x cheaper on CPU at V = 32k
    (50 ms → 2.5 ms per model and micro-batch of 2 x 256 tokens).
    """
    with torch.no_grad():
        return torch.stack([c.detach().sum(dtype=torch.float32) for c in chunks]).sum()


def _launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


class RecipeCallback(Protocol):
    """What :func:`run` and :class:`KDTADRecipe` call back during training (every method is optional).

    ``on_train_start(recipe)`` runs once after ``setup`` (``recipe.global_step`` is the step resumed from, 0 on a
    fresh run); ``on_step_end(recipe, step, metrics)`` after every optimizer step, on every rank, once the
    step's metrics are logged and before a step checkpoint is written (a crash between the two repeats the
    call after resume, for the same step and weights).
    """

    def on_train_start(self, recipe: KDTADRecipe) -> None: ...

    def on_step_end(self, recipe: KDTADRecipe, step: int, metrics: dict[str, float]) -> None: ...


class KDTADRecipe(FTRecipeInterface):
    """Full-parameter knowledge distillation with TAD (or any ``tad_torchtune`` divergence).

    Usable in-process through :func:`run` (``run(cfg, callbacks=[...])``), or step by step:
    ``r = KDTADRecipe(cfg); r.setup(cfg); r.train(); r.cleanup()``. After ``train``, ``r.metrics_history``
    holds one dict of metrics per optimizer step (all ranks agree on the values); ``r.student`` is the
    trained student module.

    Args:
        cfg (DictConfig): the recipe config (``docs/recipe.md``).
        callbacks (Sequence[RecipeCallback]): called at the start of training and after every step. Default: ()

    Raises:
        ValueError: inconsistent loss weights, bad dtype, unsupported values (each message names the key);
            ``ConfigValidationError`` lists every start-up problem (values, files, another run's checkpoints,
            config drift on resume).
        RunLockError: another live process holds ``output_dir``.
    """

    def __init__(self, cfg: DictConfig, callbacks: Sequence[RecipeCallback] = ()) -> None:
        self._callbacks = list(callbacks)
        # Every start-up check (keys, hyperparameters, checkpoints, vocabularies, data, output dir, resume) before
        # a process group, model or dataset exists; raises ConfigValidationError listing all problems.
        notes: list[str] = []
        global_rank = int(os.environ.get("RANK", "0"))
        # Only rank 0 asks whether output_dir is in use: the other ranks may find their own rank 0 holding it.
        # What validation built (tokenizer, datasets) is handed to setup rather than built a second time.
        self._validated: dict[str, Any] = {}
        validate_or_raise(cfg, notes=notes, check_lock=global_rank == 0, built=self._validated)
        for note in notes if global_rank == 0 else []:
            log.warning(note)
        # Every plain value, typed and defaulted by the parse validation ran (recipe_settings): nothing below
        # reads a setting from the raw config again; components stay config nodes for config.instantiate.
        settings: RecipeSettings = self._validated.pop("settings")
        self._settings = settings
        # One run per output_dir: the writing process (global rank 0) holds an exclusive lock until it ends.
        self._run_lock = RunLock(settings.output_dir).acquire() if global_rank == 0 else None
        if self._run_lock is not None:
            for p in remove_stale_partials(settings.output_dir / "checkpoints"):
                log.info(f"removed {p.name}, left by an interrupted checkpoint write or prune")
        self._config = OmegaConf.to_container(cfg, resolve=True)
        self._run_id = new_run_id()  # replaced by the checkpoint's run id on resume
        # A torchrun worker whose launcher died stops at the next step boundary instead of training unattended.
        self._parent_watch = ParentWatch() if _launched_by_torchrun() else None
        # --- distributed: only when launched by torchrun (or a process group already exists) ---
        self._owns_process_group = False
        if _launched_by_torchrun() and not dist.is_initialized():
            device_type = "cuda" if str(settings.device).startswith("cuda") else str(settings.device)
            dist.init_process_group(backend=training.get_distributed_backend(device_type))
            self._owns_process_group = True
        self._distributed = dist.is_available() and dist.is_initialized()
        self.world_size, self.rank = (dist.get_world_size(), dist.get_rank()) if self._distributed else (1, 0)
        self._is_rank_zero = self.rank == 0

        self._device = utils.get_device(device=settings.device)
        self._dtype = training.get_dtype(settings.dtype, device=self._device)
        self._output_dir = settings.output_dir
        self._log_every_n_steps = settings.logging.log_every_n_steps
        self._progress_bar = settings.logging.progress_bar
        self._log_peak_memory_stats = settings.logging.log_peak_memory_stats
        # FLOP accounting (docs/recipe.md "Metrics").
        self._log_flops = settings.logging.log_flops
        self._peak_flops = settings.logging.peak_flops
        self._flops_per_token: FlopsPerToken | None = None  # set by setup when log_flops

        # --- loss weights: (ce_weight, kd_weight), torchtune's kd_ratio already applied ---
        self._ce_weight, self._kd_weight = settings.loss.ce_weight, settings.loss.kd_weight
        self._cosine_weight = settings.loss.cosine_weight
        # teacher_cache: the divergence reads cached teacher rows (docs/teacher_cache.md); no teacher is loaded.
        self._teacher_cache_path = settings.loss.teacher_cache
        self._teacher_cache: tcache.TeacherCache | None = None
        self._cache_loss: SparseTeacherLoss | None = None
        self._use_teacher = settings.loss.uses_live_teacher

        # --- training loop ---
        self._seed = training.set_seed(seed=settings.seed)  # the seed, or the random one drawn (same on every rank)
        self.total_epochs = settings.loop.epochs
        self.max_steps_per_epoch = settings.loop.max_steps_per_epoch
        self._gradient_accumulation_steps = settings.loop.gradient_accumulation_steps
        self._clip_grad_norm = settings.loop.clip_grad_norm
        self._save_every_n_steps = settings.checkpointing.save_every_n_steps
        self._keep_last_n = settings.checkpointing.keep_last_n_checkpoints
        self._resume = settings.checkpointing.resume_from_checkpoint
        self._compile = settings.student.compile
        self._fused_mode = settings.loss.fused_mode
        self._fused_chunk_size = settings.loss.fused_chunk_size
        self._fused_loss: FusedLinearDistillationLoss | None = None  # set by setup when the fused path is used
        self._loss_path_message = ""
        self._on_policy: OnPolicy | None = None  # set by setup when on_policy.fraction > 0
        self._checkpoint_root = self._output_dir / "checkpoints"

        self.global_step = 0
        self.epochs_run = 0
        self._steps_in_epoch = 0  # optimizer steps already taken in the current epoch (mid-epoch resume)
        self.metrics_history: list[dict[str, float]] = []
        self._hidden_student: HiddenStateCapture | None = None
        self._hidden_teacher: HiddenStateCapture | None = None
        self._metric_logger = None
        # Non-finite logits/loss/gradients: skip the step or stop (docs/reliability.md).
        self._guard = NonFiniteGuard(settings.nonfinite_policy, distributed=self._distributed)

    @property
    def student(self) -> nn.Module:
        """The student being trained (FSDP2-sharded under ``torchrun``); set by :meth:`setup`."""
        return self._model

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (``None`` when the run trains on CE only); set by :meth:`setup`."""
        return self._teacher_model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The student's optimizer; set by :meth:`setup`."""
        return self._optimizer

    @property
    def kd_loss(self) -> nn.Module | None:
        """The configured divergence (``kd_loss``); set by :meth:`setup`."""
        return self._kd_loss

    @property
    def fused_loss(self) -> nn.Module | None:
        """The fused loss when the run takes the fused path, else ``None``; :attr:`loss_path` says why."""
        return self._fused_loss

    @property
    def loss_path(self) -> str:
        """The logged one-line account of the loss path chosen (fused or chunked logits, and why)."""
        return self._loss_path_message

    @property
    def settings(self) -> RecipeSettings:
        """The run's typed settings (``recipe_settings.parse_settings`` of its config, defaults applied)."""
        return self._settings

    @property
    def guard(self) -> NonFiniteGuard:
        """The non-finite guard: ``skipped_steps``, ``last_report`` (docs/reliability.md)."""
        return self._guard

    def _call_back(self, hook: str, *args: Any) -> None:
        for callback in self._callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    # ------------------------------------------------------------------------------------------------
    # setup
    def setup(self, cfg: DictConfig) -> None:
        """Builds everything: logger, tokenizer, student, teacher, losses, optimizer, data, scheduler; resumes."""
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)  # torchtune's loggers save output_dir/torchtune_config.yaml
            log.info(f"resolved config: {self._output_dir / 'torchtune_config.yaml'}")

        resume_state = self._find_resume_state(cfg)

        self._tokenizer = self._validated.pop("tokenizer", None) or config.instantiate(cfg.tokenizer)
        self._kd_loss = config.instantiate(cfg.kd_loss) if cfg.get("kd_loss") is not None else None
        self._ignore_index, self._num_output_chunks = self._setup_loss(cfg)
        if self._teacher_cache_path is not None and self._kd_weight != 0:
            self._teacher_cache = tcache.TeacherCache(self._teacher_cache_path)
            self._cache_loss = SparseTeacherLoss.like(self._kd_loss)
            tcache.check_compatible(
                self._teacher_cache.manifest,
                top_k=self._cache_loss.top_k if self._cache_loss.divergence == "tad" else None,
                temperature=self._cache_loss.temperature,
            )

        self._checkpointer = None
        if cfg.get("checkpointer") is not None:
            # Our own step checkpoints handle resuming; the torchtune checkpointer only loads the initial
            # student and writes the final one in its format (it must load first: HF needs its weight map).
            self._checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False)
            student_sd = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
            bad = first_nonfinite(student_sd)
            if bad is not None:
                raise ValueError(
                    f"the student's input checkpoint ({cfg.checkpointer.get('checkpoint_dir')}) holds non-finite "
                    f"values: {bad}; training would carry them into every checkpoint. Repair or re-export the "
                    "checkpoint (or drop the checkpointer key to start from a random init)"
                )
        else:
            student_sd = None
        if resume_state is not None:
            # Resumed weights go in at build time: under FSDP2, loading a full state dict assigns new
            # parameter objects, which must happen before the optimizer holds references to them.
            student_sd = dict(resume_state[1])
        self._model = self._setup_model(
            cfg_model=cfg.model,
            model_state_dict=student_sd,
            enable_activation_checkpointing=self._settings.student.enable_activation_checkpointing,
            freeze=list(self._settings.student.freeze),
            custom_sharded_layers=list(self._settings.student.custom_sharded_layers or []) or None,
        )
        del student_sd

        if self._teacher_cache is not None:
            emb = getattr(self._model, "tok_embeddings", None)
            tcache.check_compatible(self._teacher_cache.manifest, vocab_size=getattr(emb, "num_embeddings", None))
        self._teacher_model = None
        if self._use_teacher:
            teacher_checkpointer = config.instantiate(cfg.teacher_checkpointer, resume_from_checkpoint=False)
            teacher_sd = teacher_checkpointer.load_checkpoint()[training.MODEL_KEY]
            self._teacher_model = self._setup_teacher_model(cfg.teacher_model, teacher_sd)
            del teacher_sd
        elif self._is_rank_zero and self._teacher_cache is not None:
            log.info(f"teacher_cache={self._teacher_cache_path}: the divergence reads cached teacher rows, no teacher")
        elif self._is_rank_zero:
            log.info("kd_weight and cosine_weight are 0: training on CE only, the teacher is not loaded")

        if self._cosine_weight > 0:
            self._setup_hidden_capture(cfg)
        self._setup_fused_loss()
        if self._log_flops:
            self._setup_flops(cfg)

        self._optimizer = self._setup_optimizer(cfg.optimizer, resume_state)
        self._dataloader, self._sampler = self._setup_data(
            cfg_dataset=cfg.dataset,
            shuffle=self._settings.loop.shuffle,
            batch_size=self._settings.loop.batch_size,
            collate_fn=self._settings.loop.collate_fn,
        )
        num_batches = len(self._dataloader)
        self._steps_per_epoch = num_batches // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, int(self.max_steps_per_epoch))
        if self._steps_per_epoch < 1:
            raise ValueError(
                f"the dataset gives {num_batches} batches per rank (batch_size={self._settings.loop.batch_size}, "
                f"world size {self.world_size}), fewer than gradient_accumulation_steps="
                f"{self._gradient_accumulation_steps}: no optimizer step is possible; use more data or a smaller batch"
            )
        self._total_steps = self.total_epochs * self._steps_per_epoch
        self._lr_scheduler = self._setup_lr_scheduler(cfg.get("lr_scheduler", None), self._total_steps)
        self._on_policy = self._setup_on_policy()

        if resume_state is not None:
            self._load_resume_state(*resume_state)
        if self._is_rank_zero:
            log.info(self._loss_path_message)
            n_train = sum(p.numel() for p in self._model.parameters() if p.requires_grad)
            n_all = sum(p.numel() for p in self._model.parameters())
            log.info(
                f"student: {n_train:,} trainable of {n_all:,} parameters; {self._steps_per_epoch} steps/epoch x "
                f"{self.total_epochs} epochs; world size {self.world_size}; loss = {self._ce_weight}*CE + "
                f"{self._kd_weight}*KD + {self._cosine_weight}*cosine"
            )

    def _setup_on_policy(self) -> OnPolicy | None:
        """The ``on_policy:`` section (``docs/on_policy.md``); None when absent or λ = 0 (the off-policy recipe)."""
        settings = self._settings.on_policy
        if settings is None or settings.fraction == 0:
            return None
        models = [m for m in (self._model, self._teacher_model) if m is not None]
        stop_ids = getattr(self._tokenizer, "stop_tokens", None) or [self._tokenizer.eos_id]
        if self._is_rank_zero:
            how = f"sampling at T={settings.temperature:g}, top_p={settings.top_p:g}" if settings.sample else "greedy"
            log.info(
                f"on-policy: {settings.fraction:g} of micro-batches get responses generated by the student ({how}, "
                f"max_new_tokens={settings.max_new_tokens}, stop ids {list(stop_ids)}); the loss path is the same"
            )
            if self._compile:
                log.warning("on-policy with compile: true: generation's one-token forwards recompile the layers")
        return OnPolicy(
            settings,
            self._model,
            self._teacher_model,
            stop_ids=stop_ids,
            pad_id=getattr(self._tokenizer, "pad_id", 0),
            ignore_index=self._ignore_index,
            seed=self._seed,
            max_seq_len=min(int(m.max_seq_len) for m in models),
            rank=self.rank,
            world_size=self.world_size,
        )

    def _setup_loss(self, cfg: DictConfig) -> tuple[int, int]:
        """Reads ``loss`` (CE) and ``kd_loss``; returns (ignore_index, num_output_chunks) shared by both."""
        ce = config.instantiate(cfg.loss) if cfg.get("loss") is not None else None
        ignore_index = getattr(ce, "ignore_index", -100)
        chunks_ce = getattr(ce, "num_output_chunks", None)
        chunks = getattr(self._kd_loss, "num_output_chunks", None) or chunks_ce or 8
        if chunks_ce is not None and self._kd_loss is not None and chunks_ce != chunks:
            raise ValueError(
                f"loss.num_output_chunks={chunks_ce} differs from kd_loss.num_output_chunks={chunks}; set both to "
                "the same value (the models emit one set of chunks for both losses)"
            )
        if self._kd_loss is not None and getattr(self._kd_loss, "ignore_index", ignore_index) != ignore_index:
            raise ValueError(
                f"loss.ignore_index={ignore_index} differs from kd_loss.ignore_index={self._kd_loss.ignore_index}"
            )
        if self._kd_weight != 0 and self._kd_loss is None:
            raise ValueError(
                f"kd_weight={self._kd_weight} but no kd_loss is configured; add kd_loss or set kd_weight: 0"
            )
        return int(ignore_index), int(chunks)

    def _fused_blocker(self) -> str | None:
        """Why the fused loss cannot be used for this run (None when it can); see ``training/loss_path.py``."""
        # The fused loss reads the student's head weight inside the root forward, where FSDP2 has unsharded the
        # root's parameters; a head that is its own FSDP unit (custom_sharded_layers) is unsharded only by its
        # own forward, which the fused path never calls, and its gradient would miss its reduce-scatter.
        out = getattr(self._model, "output", None)
        head = getattr(out, "tied_module", out)
        sharded_alone = None
        if isinstance(head, FSDPModule):
            sharded_alone = "tok_embeddings (tied to the output)" if head is not out else "output"
        kd_type = type(self._kd_loss) if self._kd_loss is not None else None
        cached = self._teacher_cache is not None
        return fused_blocker(self._kd_weight, kd_type, self._model, self._teacher_model, sharded_alone, cached)

    def _setup_fused_loss(self) -> None:
        """Decides between the fused path (hidden states + output weights, no logits) and chunked logits.

        ``fused_loss: auto`` takes the fused path whenever :meth:`_fused_blocker` finds nothing against it,
        ``true`` raises with the reason when it cannot, ``false`` keeps the chunked logits. Both paths compute
        the same sums (CE at temperature 1 on the student's logits in fp32, the divergence, its statistics).
        """
        blocker = self._fused_blocker()
        is_fused_kd = isinstance(self._kd_loss, FusedLinearDistillationLoss)
        if is_fused_kd and blocker is not None and self._kd_weight != 0:
            raise ValueError(
                f"kd_loss is {type(self._kd_loss).__name__} (fused only), but the fused loss cannot be used: "
                f"{blocker}; use a plain divergence such as tad_torchtune.TADLoss"
            )
        if self._fused_mode == "true" and blocker is not None:
            raise ValueError(f"fused_loss: true, but the fused loss cannot be used: {blocker}; set fused_loss: auto")
        if self._fused_mode == "false" and is_fused_kd and self._kd_weight != 0:
            raise ValueError(
                f"fused_loss: false, but kd_loss is {type(self._kd_loss).__name__}, which needs hidden states; "
                "use fused_loss: auto (or a plain divergence such as tad_torchtune.TADLoss with fused_loss: false)"
            )
        if self._fused_mode == "false" or blocker is not None:
            why = "fused_loss: false" if self._fused_mode == "false" else f"fused path not used: {blocker}"
            self._loss_path_message = f"loss path: chunked logits ({self._num_output_chunks} chunks per model; {why})"
            return
        if is_fused_kd:
            self._fused_loss = self._kd_loss
            # Stats, hooks and the rest of the recipe see the divergence, as on the chunked path.
            self._kd_loss = self._kd_loss.divergence
        else:
            # compile: true covers the loss too: the per-slice projection, divergence and gradient are compiled.
            self._fused_loss = FusedLinearDistillationLoss(
                self._kd_loss, chunk_size=self._fused_chunk_size, compile_chunk=self._compile
            )
        self._loss_path_message = (
            f"loss path: fused ({type(self._kd_loss).__name__} from final hidden states and output weights, "
            f"{self._fused_loss.chunk_size} tokens per slice, no [B, S, V] logits; fused_loss: {self._fused_mode})"
        )

    def _setup_flops(self, cfg: DictConfig) -> None:
        """FLOPs per token of this run (``tad_torchtune.planning.flops``) and the peak to divide by.

        The count follows the run: the student ``model`` node, the ``teacher_model`` node when the teacher is
        loaded, the loss (``tad`` for TADLoss, ``kl`` for any other divergence, ``ce`` when ``kd_weight`` is 0)
        and the path actually chosen (fused TAD projects the teacher twice when the padded length exceeds the
        slice size). It is a function of the padded length, evaluated per micro-batch from a cache. Without
        ``peak_flops`` the peak is measured once here by a matmul probe on the recipe's device and dtype (under
        FSDP2 each rank probes its device and all ranks take the largest value: every rank divides by one peak).
        """
        teacher = None
        if self._teacher_model is not None:
            teacher = OmegaConf.to_container(cfg.teacher_model, resolve=True)
        if self._kd_weight == 0 or self._teacher_cache is not None:
            loss = "ce"  # from a teacher cache: no teacher FLOPs, and the sparse divergence is not counted
        else:
            loss = "tad" if isinstance(self._kd_loss, TADLoss) else "kl"
        try:
            self._flops_per_token = FlopsPerToken(
                OmegaConf.to_container(cfg.model, resolve=True),
                teacher,
                loss=loss,
                fused=self._fused_loss is not None,
                fused_chunk_size=self._fused_loss.chunk_size if self._fused_loss is not None else None,
            )
        except ValueError as err:
            # A model our FLOP count cannot describe is no reason to stop training.
            if self._is_rank_zero:
                log.warning(f"FLOP metrics off: {err}")
            return
        source = "peak_flops in the config"
        if self._peak_flops is None:
            peak = torch.tensor(measure_matmul_peak(self._device, self._dtype), dtype=torch.float64)
            if self._distributed:
                peak = peak.to(self._device)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            self._peak_flops = float(peak)
            dtype = str(self._dtype).removeprefix("torch.")
            source = f"measured by a {dtype} matmul probe on {self._device.type}; set peak_flops to fix it"
        if self._is_rank_zero:
            f1, f2 = self._flops_per_token(1), self._flops_per_token(2)
            log.info(
                f"FLOPs per token: {f1:.4g} at length 1, + {f2 - f1:.4g} per token of padded length "
                f"(attention; loss {loss}, fused {self._fused_loss is not None}); peak "
                f"{self._peak_flops / 1e12:.4g} TFLOP/s per device ({source})"
            )

    def _full_state_dict_or_random(self, cfg_model: DictConfig, state_dict: dict | None) -> dict:
        if state_dict is not None:
            return state_dict
        # Random init (pretraining from scratch): the same weights on every rank, without touching global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed)
            with training.set_default_dtype(self._dtype):
                return config.instantiate(cfg_model).state_dict()

    def _build(
        self,
        cfg_model: DictConfig,
        state_dict: dict[str, Any],
        enable_activation_checkpointing: bool,
        custom_sharded_layers: list[str] | None,
        freeze: list[str] | None = None,
        reshard_after_forward: bool = True,
    ) -> nn.Module:
        """Instantiates a model, applies compile / AC / freezing / FSDP2 and loads ``state_dict`` (strict)."""
        if not self._distributed:
            with training.set_default_dtype(self._dtype), self._device:
                model = config.instantiate(cfg_model)
            model.load_state_dict(state_dict, strict=True)
        else:
            with training.set_default_dtype(self._dtype), torch.device("meta"):
                model = config.instantiate(cfg_model)
        if freeze:
            _freeze(model, freeze)
        if self._compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        if self._distributed:
            mesh = dist.device_mesh.init_device_mesh(self._device.type, (self.world_size,))
            training.shard_model(
                model=model,
                shard_conditions=[partial(training.get_shard_conditions, names_to_match=custom_sharded_layers)],
                cpu_offload=False,
                reshard_after_forward=reshard_after_forward,
                dp_mesh=mesh,
            )
            with training.set_default_dtype(self._dtype), self._device:
                for m in model.modules():
                    if hasattr(m, "rope_init"):
                        m.rope_init()
            training.load_from_full_model_state_dict(model, state_dict, self._device, strict=True)
            training.validate_no_params_on_meta_device(model)
        use_tensor_split_output(model, self._num_output_chunks)
        return model

    def _setup_model(
        self,
        cfg_model: DictConfig,
        model_state_dict: dict | None,
        enable_activation_checkpointing: bool,
        freeze: list[str],
        custom_sharded_layers: list[str] | None = None,
    ) -> nn.Module:
        """The trainable student (random init when no checkpointer is configured)."""
        sd = self._full_state_dict_or_random(cfg_model, model_state_dict)
        model = self._build(cfg_model, sd, enable_activation_checkpointing, custom_sharded_layers, freeze=freeze)
        model.train()
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"freeze={freeze} froze every student parameter; nothing would train")
        return model

    def _setup_teacher_model(self, cfg_model: DictConfig, model_state_dict: dict) -> nn.Module:
        """The frozen teacher: eval mode, no gradients, same sharding as the student."""
        model = self._build(cfg_model, model_state_dict, False, None)
        model.eval()
        model.requires_grad_(False)
        return model

    def _setup_hidden_capture(self, cfg: DictConfig) -> None:
        raw = cfg.get("hidden_layer_map", None)
        if raw is None:
            pairs = [(-1, -1)]
        elif isinstance(raw, (DictConfig, dict)):
            pairs = [(int(k), int(v)) for k, v in raw.items()]
        else:
            pairs = [(int(p[0]), int(p[1])) for p in raw]
        if not pairs:
            raise ValueError("hidden_layer_map is empty but cosine_weight > 0; map at least one student layer")
        self._hidden_student = HiddenStateCapture(self._model, [s for s, _ in pairs])
        self._hidden_teacher = HiddenStateCapture(self._teacher_model, [t for _, t in pairs])

    def _setup_optimizer(self, cfg_optimizer: DictConfig, resume_state: tuple | None) -> torch.optim.Optimizer:
        params = [p for p in self._model.parameters() if p.requires_grad]
        kwargs: dict[str, Any] = {}
        if cfg_optimizer.get("_component_") == "torch.optim.AdamW" and "fused" not in cfg_optimizer:
            # Fused AdamW where available (CUDA); plain foreach elsewhere.
            if self._device.type == "cuda" and "foreach" not in cfg_optimizer:
                kwargs["fused"] = True
        return config.instantiate(cfg_optimizer, params, **kwargs)

    def _setup_lr_scheduler(self, cfg_lr: DictConfig | None, num_training_steps: int):
        if cfg_lr is None:
            return None
        return config.instantiate(cfg_lr, self._optimizer, num_training_steps=num_training_steps, last_epoch=-1)

    def _setup_data(
        self, cfg_dataset: DictConfig | ListConfig, shuffle: bool, batch_size: int, collate_fn: str
    ) -> tuple[StatefulDataLoader, StatefulDistributedSampler]:
        """Dataset(s) through torchtune's builders (as validation built them, with the same tokenizer); each rank
        reads its share via a stateful sampler."""
        ds, packed, self._labels_shifted = build_dataset(
            cfg_dataset, self._tokenizer, parts=self._validated.pop("dataset_parts", None)
        )
        if self._teacher_cache is not None:
            # The cache is keyed by dataset index: each item carries its index, the collate adds its cached rows.
            tcache.check_compatible(
                self._teacher_cache.manifest, num_sequences=len(ds), corpus=tcache.corpus_fingerprint(ds)
            )
            ds = tcache.IndexedDataset(ds)
        sampler = StatefulDistributedSampler(
            ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self._seed
        )
        pad_id = getattr(self._tokenizer, "pad_id", 0)
        collate = (
            padded_collate_packed
            if packed
            else partial(_get_component_from_path(collate_fn), padding_idx=pad_id, ignore_idx=self._ignore_index)
        )
        if self._teacher_cache is not None:
            collate = tcache.CacheCollate(collate, self._teacher_cache)
        # drop_last: every rank and every step sees full micro-batches (equal work, equal shapes).
        # Pinned host batches make the copies in _prepare_batch asynchronous on CUDA (no wait on the host).
        dataloader = StatefulDataLoader(
            dataset=ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            drop_last=True,
            pin_memory=self._device.type == "cuda",
        )
        return dataloader, sampler

    # ------------------------------------------------------------------------------------------------
    # checkpoints
    def _find_resume_state(self, cfg: DictConfig) -> tuple | None:
        if not self._resume:
            return None
        path = find_latest_checkpoint(self._checkpoint_root) if self._resume is True else Path(str(self._resume))
        if path is None:
            if self._is_rank_zero:
                log.warning(
                    f"resume_from_checkpoint: no complete checkpoint under {self._checkpoint_root}; "
                    "starting from step 0"
                )
            return None
        record = read_run_record(path)
        if record is not None and record.get("id"):
            self._run_id = str(record["id"])  # the resumed run keeps its identity (and prunes its own checkpoints)
        if self._is_rank_zero:
            log.info(f"resuming from {path} (run {self._run_id})")
        return (path, *load_step_checkpoint(path))

    def _load_resume_state(self, path: Path, model_sd: dict, optim_sd: dict, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{path} was written by {state['world_size']} processes but this run has {self.world_size}; "
                "resume with the same number of processes"
            )
        # The model weights were loaded when the student was built (setup); here the rest.
        if self._distributed:
            training.load_from_full_optimizer_state_dict(self._model, self._optimizer, optim_sd, self._device)
        else:
            self._optimizer.load_state_dict(optim_sd)
        if self._lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = int(state["global_step"])
        self.epochs_run = int(state["epochs_run"])
        self._steps_in_epoch = int(state["steps_in_epoch"])
        self._guard.skipped = int(state.get("nonfinite_skipped_steps", 0))
        if self._steps_in_epoch >= self._steps_per_epoch:
            # Saved after an epoch's last step: continue with a fresh epoch, not the old iterator's position.
            self.epochs_run, self._steps_in_epoch = self.epochs_run + 1, 0
        if self._steps_in_epoch > 0:
            self._dataloader.load_state_dict(state["dataloader"][self.rank])
        set_rng_state(state["rng"][self.rank])

    def save_checkpoint(self, final: bool = False) -> None:
        """Writes a resumable step checkpoint (rank 0, atomically); with ``final`` also the student in the
        checkpointer's format (HF when the input was HF) under ``output_dir/epoch_{n}``.

        Under FSDP2 the full state is gathered to CPU on rank 0 (fine up to a few billion parameters).
        """
        if self._distributed:
            model_sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
            optim_sd = training.get_full_optimizer_state_dict(
                self._model, self._optimizer, self._is_rank_zero, device=self._device
            )
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, {"dataloader": self._dataloader.state_dict(), "rng": rng_state()})
        else:
            model_sd = {k: v.detach().cpu() for k, v in self._model.state_dict().items()}
            optim_sd = self._optimizer.state_dict()
            per_rank = [{"dataloader": self._dataloader.state_dict(), "rng": rng_state()}]
        if self._is_rank_zero:
            for what, state in (("student weight", model_sd), ("optimizer state", optim_sd)):
                bad = first_nonfinite(state)
                if bad is not None:
                    raise NonFiniteError(
                        f"refusing to save the step-{self.global_step} checkpoint: {what} {bad}; the last saved "
                        f"checkpoint under {self._checkpoint_root} is unchanged. Lower optimizer.lr or set "
                        "clip_grad_norm, then resume from it"
                    )
            recipe_state = {
                "global_step": self.global_step,
                "epochs_run": self.epochs_run,
                "steps_in_epoch": self._steps_in_epoch,
                "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler is not None else None,
                "dataloader": [r["dataloader"] for r in per_rank],
                "rng": [r["rng"] for r in per_rank],
                "world_size": self.world_size,
                "seed": self._seed,
                "nonfinite_skipped_steps": self._guard.skipped,
            }
            path = save_step_checkpoint(
                self._checkpoint_root,
                self.global_step,
                model_sd,
                optim_sd,
                recipe_state,
                keep_last_n=self._keep_last_n,
                run=run_record(self._run_id, self._config, self.world_size),
            )
            log.info(f"saved step checkpoint {path}")
            if final:
                self._save_final(model_sd)
        if self._distributed:
            dist.barrier()

    def _save_final(self, model_sd: dict[str, torch.Tensor]) -> None:
        epoch = max(self.epochs_run - 1, 0)
        if self._checkpointer is not None:
            self._checkpointer.save_checkpoint(
                {training.MODEL_KEY: model_sd}, epoch=epoch, intermediate_checkpoint=False
            )
        else:
            out = self._output_dir / f"epoch_{epoch}"
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model_sd, out / "model.pt")
            log.info(f"saved final student (torchtune format, random-init run) to {out / 'model.pt'}")

    # ------------------------------------------------------------------------------------------------
    # training
    def _prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Moves a batch to the device and shifts labels to next-token labels unless the dataset did."""
        # non_blocking: from pinned memory the copy is queued on the stream, ordered before the kernels using it.
        batch = {
            k: v.to(self._device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }
        if not self._labels_shifted:
            labels = batch["labels"]
            pad = torch.full_like(labels[:, :1], self._ignore_index)
            batch["labels"] = torch.cat([labels[:, 1:], pad], dim=1)
        return batch

    def _loss_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward of teacher and student on one micro-batch.

        Args:
            batch (dict): ``tokens [B, S]``, next-token ``labels [B, S]`` (already shifted), optional
                ``mask``/``input_pos`` (packed data).

        Returns:
            dict: 0-d sums over the micro-batch's valid tokens: ``weighted`` (differentiable), ``ce``, ``kd``,
            ``cosine`` (detached), plus ``kd_stats`` (the divergence's ``last_stats``).
        """
        tokens, labels = batch["tokens"], batch["labels"]
        model_kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
        valid = labels != self._ignore_index if self._hidden_student is not None else None  # cosine term only
        zero = torch.zeros((), device=self._device)

        if self._fused_loss is not None:
            return self._fused_loss_step(tokens, labels, valid, model_kwargs)

        teacher_logits = teacher_hidden = None
        if self._teacher_model is not None:
            with torch.no_grad():
                teacher_logits = non_empty(self._teacher_model(tokens, **model_kwargs))
                if self._hidden_teacher is not None:
                    teacher_hidden = self._hidden_teacher.pop()
        student_logits = non_empty(self._model(tokens, **model_kwargs))
        if teacher_logits is not None:
            # Only the columns the loss reads: a teacher's extra vocabulary rows are cut, as on the fused path.
            vocab = student_logits[0].size(-1)
            self._guard.watch("teacher_logits", _finite_probe([c[..., :vocab] for c in teacher_logits]))
        self._guard.watch("student_logits", _finite_probe(student_logits))
        label_chunks = labels.split([c.size(1) for c in student_logits], dim=1)

        ce = sum(
            F.cross_entropy(lg.float().flatten(0, 1), lb.flatten(), ignore_index=self._ignore_index, reduction="sum")
            for lg, lb in zip(student_logits, label_chunks, strict=True)
        )
        weighted = self._ce_weight * ce
        kd, kd_stats = zero, {}
        if self._cache_loss is not None:
            cached = SparseTeacher(*[t.to(self._device, non_blocking=True) for t in batch[tcache.BATCH_KEY]])
            kd = self._cache_loss(student_logits, cached, labels, normalize=False)
            kd_stats = dict(self._cache_loss.last_stats)
            weighted = weighted + self._kd_weight * kd
        elif self._kd_weight != 0:
            kd = self._kd_loss(student_logits, teacher_logits, labels, normalize=False)
            kd_stats = dict(self._kd_loss.last_stats)
            weighted = weighted + self._kd_weight * kd
        del teacher_logits  # free the teacher's logits before the student's backward
        student_hidden = self._hidden_student.pop() if self._hidden_student is not None else None
        return self._step_result(weighted, ce, kd, kd_stats, student_hidden, teacher_hidden, valid)

    def _fused_loss_step(
        self, tokens: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None, model_kwargs: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """:meth:`_loss_step` on the fused path: CE and the divergence from hidden states, slice by slice.

        The student's loss is computed inside its forward (its output weight gathered once by FSDP2, its
        gradient computed in the forward); returns the same dict as the chunked path.
        """
        zero = torch.zeros((), device=self._device)
        weighted = fused_distillation_loss(
            self._model,
            self._teacher_model,
            tokens,
            labels,
            self._fused_loss,
            normalize=False,
            kd_weight=self._kd_weight,
            ce_weight=self._ce_weight,
            **model_kwargs,
        )
        kd_stats = dict(self._fused_loss.last_stats)
        # The fused loss only computes CE when its weight is non-zero (then ce_loss is not logged).
        ce = kd_stats.pop("ce_sum", zero)
        kd = kd_stats["divergence_sum"]
        student_hidden = teacher_hidden = None
        if self._hidden_student is not None:
            # The layer hooks fired during both forwards (the fused path only replaces the output head).
            teacher_hidden, student_hidden = self._hidden_teacher.pop(), self._hidden_student.pop()
        return self._step_result(weighted, ce, kd, kd_stats, student_hidden, teacher_hidden, valid)

    def _step_result(
        self,
        weighted: torch.Tensor,
        ce: torch.Tensor,
        kd: torch.Tensor,
        kd_stats: dict[str, torch.Tensor],
        student_hidden: list[torch.Tensor] | None,
        teacher_hidden: list[torch.Tensor] | None,
        valid: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Adds the cosine hidden-state term (when layers are mapped) and packs one micro-batch's results."""
        cos = torch.zeros((), device=self._device)
        if student_hidden is not None:
            cos = sum(cosine_distance_sum(s, t, valid) for s, t in zip(student_hidden, teacher_hidden, strict=True))
            weighted = weighted + self._cosine_weight * cos
        return {
            "weighted": weighted,
            "ce": ce.detach(),
            "kd": kd.detach(),
            "cosine": cos.detach(),
            "kd_stats": kd_stats,
        }

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _next_micro_batches(self, it) -> list[dict[str, torch.Tensor]]:
        micro = [self._prepare_batch(next(it)) for _ in range(self._gradient_accumulation_steps)]
        if self._on_policy is not None:  # the student's samples replace the on-policy micro-batches' responses
            micro = self._on_policy.rollout(micro, self.global_step + 1)
        return micro

    def train(self) -> None:
        """Runs the epochs; checkpoints every ``save_every_n_steps`` and at the end."""
        if self._device.type == "cuda":
            training.cleanup_before_training()
        self._optimizer.zero_grad(set_to_none=True)
        params = [p for p in self._model.parameters() if p.requires_grad]
        show = self._is_rank_zero and self._progress_bar
        pbar = tqdm(total=self._total_steps, initial=self.global_step, disable=not show)
        self._call_back("on_train_start")
        while self.epochs_run < self.total_epochs:
            self._sampler.set_epoch(self.epochs_run)
            it = iter(self._dataloader)
            while self._steps_in_epoch < self._steps_per_epoch:
                if self._parent_watch is not None:
                    self._parent_watch.check()
                t0 = time.perf_counter()
                micro = self._next_micro_batches(it)
                # N: valid tokens of the whole step on all ranks, known before any backward.
                counts = torch.stack([(b["labels"] != self._ignore_index).sum() for b in micro])  # per micro-batch
                num_tokens = self._all_reduce(counts.sum().float())
                # FSDP2 averages gradients over ranks; multiply back so the gradient is Σ/N exactly.
                scale = self.world_size / num_tokens.clamp_min(1.0)
                sums = {"ce": 0.0, "kd": 0.0, "cosine": 0.0}
                stats: dict[str, torch.Tensor] = {}
                for batch in micro:
                    out = self._loss_step(batch)
                    self._guard.watch("loss", out["weighted"])
                    if self._on_policy is not None:
                        self._on_policy.observe(out)
                    (out["weighted"] * scale).backward()
                    for k in sums:
                        sums[k] = sums[k] + out[k]
                    for k, v in out["kd_stats"].items():
                        stats[k] = stats[k] + v.detach() if k in stats else v.detach()
                    del out
                if self._clip_grad_norm:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=float(self._clip_grad_norm))
                else:
                    # Only logged: the norm without clip_grad_norm_'s multiply of every gradient by 1.
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                self._guard.watch("update", self._applied_update_scale(grad_norm))
                if not self._guard.before_optimizer_step(self.global_step + 1, grad_norm, micro):
                    pass  # a non-finite value: no optimizer step (the guard counted and logged it, or raised)
                elif float(num_tokens) > 0:
                    self._optimizer.step()
                elif self._is_rank_zero:
                    log.warning(f"step {self.global_step + 1}: every label is ignored; optimizer step skipped")
                self._optimizer.zero_grad(set_to_none=True)
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1
                self._steps_in_epoch += 1
                seconds = time.perf_counter() - t0
                seq_lens = [b["tokens"].size(1) for b in micro]
                metrics = self._step_metrics(sums, stats, num_tokens, counts, seq_lens, grad_norm, seconds)
                metrics["nonfinite_skipped_steps"] = float(self._guard.skipped)
                if self._on_policy is not None:
                    metrics.update(self._on_policy.step_metrics(self._device))
                self.metrics_history.append(metrics)
                if self._is_rank_zero:
                    pbar.update(1)
                    if self.global_step % self._log_every_n_steps == 0:
                        pbar.set_description(self._progress_line(metrics))
                        self._metric_logger.log_dict(metrics, step=self.global_step)
                self._call_back("on_step_end", self.global_step, metrics)
                last = self.epochs_run == self.total_epochs - 1 and self._steps_in_epoch == self._steps_per_epoch
                if self._save_every_n_steps and self.global_step % int(self._save_every_n_steps) == 0 and not last:
                    self.save_checkpoint()
            self.epochs_run += 1
            self._steps_in_epoch = 0
        pbar.close()
        self.save_checkpoint(final=True)

    def _applied_update_scale(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """0-d: the norm of the gradients the optimizer will see (after clipping) times every learning rate.

        Finite iff what the optimizer applies is: a NaN ``max_norm`` makes every clipped gradient NaN although
        the pre-clip norm is finite, and an infinite learning rate turns finite gradients into infinite steps.
        """
        norm = torch.as_tensor(grad_norm).detach().double()
        if self._clip_grad_norm:
            # clip_grad_norm_ multiplies every gradient by min(1, max_norm / (norm + 1e-6)).
            coef = (float(self._clip_grad_norm) / (norm + 1e-6)).clamp(max=1.0)
            norm = norm * coef
        lrs = [float(g["lr"]) for g in self._optimizer.param_groups]
        return norm * torch.tensor(lrs, dtype=torch.float64, device=norm.device).sum()

    def _step_metrics(
        self,
        sums: dict[str, torch.Tensor],
        stats: dict[str, torch.Tensor],
        num_tokens: torch.Tensor,
        counts: torch.Tensor,
        seq_lens: list[int],
        grad_norm: torch.Tensor,
        seconds: float,
    ) -> dict[str, float]:
        """All-reduced step metrics (one collective): means per valid token of the whole step.

        Throughput and FLOP metrics are this rank's own: ``counts`` ``[G]`` valid tokens of each micro-batch
        and ``seq_lens`` their padded lengths; ``seconds`` the step's wall time on this rank.
        """
        keys = sorted(stats)
        vec = torch.stack(
            [torch.as_tensor(sums[k], device=self._device, dtype=torch.float32) for k in sums]
            + [stats[k].float().to(self._device) for k in keys]
        )
        vec = self._all_reduce(vec).tolist()
        n = max(float(num_tokens), 1.0)
        ce, kd, cos = (v / n for v in vec[:3])
        reduced = dict(zip(keys, vec[3:], strict=True))
        metrics = {
            "loss": self._ce_weight * ce + self._kd_weight * kd + self._cosine_weight * cos,
            "ce_loss": ce,
            "kd_loss": kd,
        }
        if self._fused_loss is not None and self._ce_weight == 0:
            del metrics["ce_loss"]  # not computed on the fused path when its weight is 0
        if self._cosine_weight > 0:
            metrics["cosine_loss"] = cos
        # Each statistic over its own denominator (the chunk-kernel protocol's stat_denominators: w(X) per row).
        denominators = getattr(self._kd_loss, "stat_denominators", {})
        for key, value in reduced.items():
            if key in ("num_tokens", "num_rows", "divergence_sum"):
                continue
            denom = reduced.get(denominators.get(key, "num_tokens"), n)
            metrics[key.removesuffix("_sum") + "_mean"] = value / max(denom, 1.0)
        metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = float(self._optimizer.param_groups[0]["lr"])
        metrics["num_tokens"] = float(num_tokens)
        local_counts = counts.tolist()
        local_tokens = float(sum(local_counts))
        seconds = max(seconds, 1e-9)
        metrics["tokens_per_second_per_gpu"] = local_tokens / seconds
        if self._flops_per_token is not None:
            # Valid tokens get FLOPs (as tokens_per_second_per_gpu counts them), each at the FLOPs per token of
            # its micro-batch's padded length, so tflops = tokens/s x flops_per_token and padding is lost MFU.
            step_flops = sum(n * self._flops_per_token(s) for n, s in zip(local_counts, seq_lens, strict=True))
            metrics["flops_per_token"] = (
                step_flops / local_tokens if local_tokens > 0 else self._flops_per_token(max(seq_lens))
            )
            metrics["tflops_per_second_per_gpu"] = step_flops / seconds / 1e12
            metrics["mfu"] = step_flops / seconds / self._peak_flops
        if self._log_peak_memory_stats:
            if self._device.type == "cuda":
                metrics["peak_memory_alloc_gib"] = torch.cuda.max_memory_allocated(self._device) / 2**30
                metrics["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self._device) / 2**30
                mem = torch.cuda.memory_stats(self._device)  # host-side counters: no device sync
                metrics["memory_alloc_gib"] = mem.get("allocated_bytes.all.current", 0) / 2**30
                # cudaMalloc retries (the cache was flushed to satisfy an allocation) and OOMs survived: a
                # non-zero, growing count means fragmentation is costing time; see docs/performance.md.
                metrics["alloc_retries"] = float(mem.get("num_alloc_retries", 0))
            else:
                metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics

    def _progress_line(self, metrics: dict[str, float]) -> str:
        """The tqdm description: epoch|step|loss, and the achieved TFLOP/s and MFU when they are logged."""
        line = f"{self.epochs_run + 1}|{self.global_step}|loss: {metrics['loss']:.4f}"
        if "mfu" in metrics:
            line += f"|{metrics['tflops_per_second_per_gpu']:.3g} TFLOP/s|mfu: {100 * metrics['mfu']:.1f}%"
        return line

    def cleanup(self) -> None:
        """Closes the logger, removes hooks, and ends the process group if this recipe started it."""
        if self._metric_logger is not None:
            self._metric_logger.close()
        for cap in (self._hidden_student, self._hidden_teacher):
            if cap is not None:
                cap.remove()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        if self._run_lock is not None:
            self._run_lock.release()


def build_dataset(
    cfg_dataset: DictConfig | ListConfig, tokenizer: Any, parts: list[Any] | None = None
) -> tuple[Any, bool, bool]:
    """The recipe's dataset (a list of parts is concatenated, in order): ``(dataset, packed, shifted_labels)``.

    Shared with the teacher-cache writer, which keys its rows by this dataset's item indices. ``parts``: the
    datasets already built from ``cfg_dataset`` with ``tokenizer`` (one per entry; validation's), used as they are.
    """
    if isinstance(cfg_dataset, ListConfig):
        parts = parts or [config.instantiate(c, tokenizer) for c in cfg_dataset]
        shifted = [bool(getattr(p, "shifted_labels", False)) for p in parts]
        if len(set(shifted)) > 1:
            raise ValueError(
                "dataset parts disagree on shifted_labels (some return next-token labels, some unshifted); "
                "use datasets of one kind in one run"
            )
        return ConcatDataset(parts), any(bool(c.get("packed", False)) for c in cfg_dataset), shifted[0]
    ds = parts[0] if parts else config.instantiate(cfg_dataset, tokenizer)
    return ds, bool(cfg_dataset.get("packed", False)), bool(getattr(ds, "shifted_labels", False))


def _freeze(model: nn.Module, patterns: list[str]) -> None:
    """``requires_grad_(False)`` on parameters whose name contains any pattern (regular expressions)."""
    import re

    matched = set()
    for name, p in model.named_parameters():
        for pat in patterns:
            if re.search(pat, name):
                p.requires_grad_(False)
                matched.add(pat)
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        raise ValueError(f"freeze patterns {unmatched} match no student parameter (names look like 'layers.0.attn...')")


def run(cfg: DictConfig, callbacks: Sequence[RecipeCallback] = ()) -> KDTADRecipe:
    """Runs the recipe in this process (set-up, training, clean-up) and returns it, trained.

    Args:
        cfg (DictConfig): the recipe config (``docs/recipe.md``).
        callbacks (Sequence[RecipeCallback]): training-start and step-end hooks (evaluation, logging).

    Returns:
        KDTADRecipe: the finished recipe (``metrics_history``, ``student``, ``global_step``).
    """
    recipe = KDTADRecipe(cfg, callbacks=callbacks)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``python -m tad_torchtune.recipes.kd_tad --config X [key=value ...]``."""
    # The resolved config goes to a file in output_dir (setup), not the log.
    run(cfg)


def main() -> int:
    """``python -m``/``tune run`` entry: a refused input is one message on stderr and exit code 1, no traceback
    (``--debug`` or ``TAD_DEBUG=1`` re-raises it; ``tad_torchtune.reliability.errors``)."""
    debug, sys.argv = debug_requested(sys.argv)
    return run_reporting(recipe_main, "knowledge_distillation_tad", debug)


if __name__ == "__main__":
    sys.exit(main())
