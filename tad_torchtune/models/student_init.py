"""Student-from-teacher initialisation (paper Section 3.2, Appendix B).

A student is a torchtune ``TransformerDecoder`` with fewer layers and possibly a smaller hidden size,
head dim, number of heads or intermediate size than its teacher. :func:`init_student_from_teacher`
copies into it, DistilBERT-style:

* **Layer selection** -- student layer ``i`` is initialised from teacher layer ``layers[i]``
  (:func:`select_layers` gives "every_other", "every_third", "first_half" or an explicit list).
* **Attention, per head** -- every projection is cut head by head, never as a flat block, so each
  student head is a slice of one teacher head:

  - ``q_proj.weight`` ``[H_T*d_T, D_T]`` is viewed as ``[H_T, d_T, D_T]``; student query head ``h``
    takes teacher query head ``qsel[h]``, its rows ``dsel_qk`` and columns ``[:D_S]``.
    ``k_proj``/``v_proj`` do the same with the KV heads ``kvsel`` (rows ``dsel_qk`` for k,
    ``[:d_S]`` for v). Biases follow their rows.
  - ``output_proj.weight`` ``[D_T, H_T*d_T]`` is viewed as ``[D_T, H_T, d_T]``; rows ``[:D_S]``,
    heads ``qsel``, per-head columns ``[:d_S]`` (the same value dims as ``v_proj``, so each head's
    value and output slices stay matched).
  - Head selection: with KV groups of ``g_T = H_T / KV_T`` query heads, student KV head ``j`` is
    teacher KV head ``j`` and student query head ``j*g_S + r`` is teacher query head ``j*g_T + r``,
    so every kept query head still reads the KV head it was trained with. A student with more query
    heads per KV head than the teacher (``g_S = p * g_T``) takes the first ``H_S`` query heads and
    mean-pools each group's ``p`` teacher KV heads into one (the GQA paper's conversion).
  - Rotary pairs are kept together (``dsel_qk``): for interleaved RoPE (torchtune's
    ``RotaryPositionalEmbeddings``: pairs ``(2i, 2i+1)``, Llama/Gemma in tune format) the first
    ``d_S`` dims; for rotate-half RoPE (Qwen2, Phi-3, Phi-2: pairs ``(i, i + d/2)``) dims
    ``[0, d_S/2)`` and ``[d_T/2, d_T/2 + d_S/2)``. The kept pairs are the highest-frequency ones.
    The student's RoPE frequencies are ``base^(-2i/d_S)``, not the teacher's ``base^(-2i/d_T)``,
    so a truncated head is an initialisation, not an exact copy of the teacher's function.
  - Per-head q/k norms (Qwen3's ``q_norm``/``k_norm``: one ``[d]`` scale shared by all heads) keep the
    same dims ``dsel_qk`` as the q/k rows they scale.
* **MLP** -- copied when ``copy_mlp`` (every weight's leading slice: ``w1/w3 [:I_S, :D_S]``,
  ``w2 [:D_S, :I_S]``, biases likewise); left at the student's own init otherwise (the paper's
  Qwen1.5 students use random MLPs).
* **Norms, embeddings, output** -- leading slices ``[:D_S]`` (embeddings ``[:V_S, :D_S]``, so
  Qwen2.5-7B's 152,064 rows give a small Qwen2.5's 151,936); embeddings optionally frozen
  (``requires_grad=False``), as for the paper's Phi-2 / Qwen2.5 / Gemma2 students.
* **Tied embeddings** -- a tied student (``TiedLinear`` output, no ``output.weight``) gets the teacher's
  input embedding, also when the teacher is untied (Qwen3-8B -> a Qwen3-1.7B-shaped student); an untied
  student of a tied teacher gets the teacher's embedding as its output projection.

Tensors whose student and teacher shapes are equal are copied whole, so a student with the teacher's
widths and fewer layers is an exact layer subset.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["select_layers", "init_student_from_teacher"]

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def select_layers(
    num_teacher_layers: int, spec: str | Sequence[int], num_student_layers: int | None = None
) -> list[int]:
    """Teacher layer indices that initialise the student's layers, in order.

    Args:
        num_teacher_layers (int): number of teacher layers ``L_T``.
        spec (str | Sequence[int]): ``"every_other"`` (``0, 2, 4, ...``: ``ceil(L_T/2)`` layers),
            ``"every_third"`` (``0, 3, 6, ...``), ``"first_half"`` (``0 .. L_T//2 - 1``), ``"all"``,
            ``"uniform"`` (``L_S`` layers spread evenly from the first to the last: ``round(i (L_T-1)/(L_S-1))``,
            e.g. Qwen3-8B's 36 -> 28 for a Qwen3-1.7B-shaped student), or an explicit list of distinct,
            increasing indices in ``[0, L_T)``.
        num_student_layers (int | None): ``L_S``, needed by ``"uniform"`` only. Default: None

    Returns:
        list[int]: teacher layer index for each student layer.

    Raises:
        ValueError: unknown spec, or an index out of range / repeated / not increasing.

    Example:
        >>> select_layers(24, "every_other")[:3]
        [0, 2, 4]
    """
    if num_teacher_layers <= 0:
        raise ValueError(f"num_teacher_layers must be positive, got {num_teacher_layers}")
    if spec == "uniform":
        n = num_student_layers
        if n is None or not 1 <= n <= num_teacher_layers:
            raise ValueError(f"layers='uniform' needs 1 <= num_student_layers <= {num_teacher_layers}, got {n}")
        if n == 1:
            return [0]
        return [round(i * (num_teacher_layers - 1) / (n - 1)) for i in range(n)]
    if isinstance(spec, str):
        named = {
            "every_other": list(range(0, num_teacher_layers, 2)),
            "every_third": list(range(0, num_teacher_layers, 3)),
            "first_half": list(range(num_teacher_layers // 2)),
            "all": list(range(num_teacher_layers)),
        }
        if spec not in named:
            raise ValueError(
                f"unknown layer spec {spec!r}; use one of {sorted([*named, 'uniform'])} or an explicit list of indices"
            )
        return named[spec]
    layers = [int(i) for i in spec]
    if not layers:
        raise ValueError("explicit layer list is empty")
    bad = [i for i in layers if not 0 <= i < num_teacher_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a teacher with {num_teacher_layers} layers")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"layer indices must be strictly increasing, got {layers}")
    return layers


def _rope_layout(attn: nn.Module) -> str:
    """'interleaved' for torchtune's RotaryPositionalEmbeddings family (and Llama-3.1/3.2's scaled RoPE),
    else 'half' (HF rotate-half: Qwen2, Qwen3, Phi-3)."""
    from torchtune.models.llama3_1 import Llama3ScaledRoPE
    from torchtune.modules import RotaryPositionalEmbeddings

    pos = getattr(attn, "pos_embeddings", None)
    layout = getattr(pos, "rope_layout", None)
    if layout is not None:
        return layout
    return "interleaved" if isinstance(pos, (RotaryPositionalEmbeddings, Llama3ScaledRoPE)) else "half"


def _head_dims(d_t: int, d_s: int, layout: str) -> torch.Tensor:
    """Per-head query/key dims of the teacher kept for the student (rotary pairs stay together)."""
    if d_s > d_t:
        raise ValueError(f"student head_dim {d_s} is larger than the teacher's {d_t}; cannot truncate")
    if layout == "interleaved" or d_s == d_t:
        return torch.arange(d_s)
    if d_s % 2:
        raise ValueError(f"rotate-half RoPE needs an even student head_dim, got {d_s}")
    half = torch.arange(d_s // 2)
    return torch.cat([half, half + d_t // 2])


def _head_select(h_t: int, kv_t: int, h_s: int, kv_s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher query heads ``[h_s]`` and, for each student KV head, the teacher KV heads it is made of
    ``[kv_s, m]`` (``m = 1`` unless pooled), so every kept query head reads (a pool of) the KV head(s) it was
    trained with.

    * ``g_S <= g_T`` (query heads per KV head; e.g. Qwen3-8B 32/8 -> Qwen3-1.7B 16/8): student KV head ``j`` is
      teacher KV head ``j``, its query heads ``j*g_S + r`` are teacher query heads ``j*g_T + r``.
    * ``g_S > g_T`` with ``g_S % g_T == 0`` (e.g. an MHA teacher to a GQA student): student KV head ``j`` is the
      mean of the ``g_S / g_T`` teacher KV heads whose query heads it takes (``j*g_S .. (j+1)*g_S - 1``), as
      in the GQA paper's mean-pooled conversion.
    * otherwise the first ``h_s`` / ``kv_s`` heads (no grouping can be kept).
    """
    if kv_s > kv_t or h_s > h_t:
        raise ValueError(f"student heads ({h_s} q / {kv_s} kv) exceed the teacher's ({h_t} q / {kv_t} kv)")
    g_t, g_s = h_t // kv_t, h_s // kv_s
    if g_s <= g_t:
        q = torch.tensor([j * g_t + r for j in range(kv_s) for r in range(g_s)])
        return q, torch.arange(kv_s).unsqueeze(1)
    if g_s % g_t == 0:
        pool = g_s // g_t
        return torch.arange(h_s), torch.arange(kv_s * pool).view(kv_s, pool)
    return torch.arange(h_s), torch.arange(kv_s).unsqueeze(1)


def _attn_geometry(model: nn.Module) -> tuple[int, int, int, int, str]:
    attn = model.layers[0].attn
    return attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.embed_dim, _rope_layout(attn)


def _leading_slice(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(t.shape) != len(shape) or any(s > ts for s, ts in zip(shape, t.shape, strict=True)):
        raise ValueError(
            f"cannot slice a teacher tensor of shape {tuple(t.shape)} to {tuple(shape)}: a student dim is larger "
            "than the teacher's; build the student with widths <= the teacher's"
        )
    return t[tuple(slice(0, s) for s in shape)]


def _attn_slice(name: str, t: torch.Tensor, geo_t, geo_s) -> torch.Tensor:
    """Per-head truncation of one attention tensor (see the module docstring for the slices)."""
    h_t, kv_t, d_t, _, layout = geo_t
    h_s, kv_s, d_s, e_s, _ = geo_s
    qsel, kv_groups = _head_select(h_t, kv_t, h_s, kv_s)
    dsel_qk = _head_dims(d_t, d_s, layout)
    dsel_v = torch.arange(d_s)
    proj, _, kind = name.rpartition(".")
    proj = proj.rsplit(".", 1)[-1]
    if proj in ("q_norm", "k_norm"):  # one [d] scale over each head's dims: keep the q/k dims kept
        return t[dsel_qk]
    if proj in ("q_proj", "k_proj", "v_proj"):
        dsel = dsel_v if proj == "v_proj" else dsel_qk
        if proj == "q_proj":
            x = t.reshape(h_t, d_t, *t.shape[1:])[qsel]  # [h_s, d_t, (D_T)]
        else:  # each student KV head: the mean of its pool of teacher KV heads (a pool of one: a copy)
            x = t.reshape(kv_t, d_t, *t.shape[1:])[kv_groups].mean(dim=1)  # [kv_s, d_t, (D_T)]
        x = x[:, dsel]  # [heads, d_s, (D_T)]
        if kind == "weight":
            x = x[..., :e_s]
        return x.reshape(-1, *x.shape[2:])
    if proj == "output_proj":
        if kind == "bias":
            return t[:e_s]
        x = t[:e_s].reshape(e_s, h_t, d_t)[:, qsel][:, :, dsel_v]  # [D_S, h_s, d_s]
        return x.reshape(e_s, -1)
    raise ValueError(f"unexpected attention parameter {name!r}")


@torch.no_grad()
def init_student_from_teacher(
    student: nn.Module,
    teacher_state_dict: dict[str, torch.Tensor],
    layers: Sequence[int],
    *,
    copy_embeddings: bool = True,
    copy_output: bool = True,
    copy_attention: bool = True,
    copy_mlp: bool = False,
    copy_norms: bool = True,
    freeze_embeddings: bool = False,
    teacher_num_heads: int | None = None,
    teacher_num_kv_heads: int | None = None,
) -> dict[str, list[str]]:
    """Initialise a torchtune student in place from a teacher's torchtune-format state dict.

    Args:
        student (nn.Module): a torchtune ``TransformerDecoder`` (materialised, not on ``meta``).
        teacher_state_dict (dict[str, torch.Tensor]): the teacher's weights in torchtune naming
            (``tok_embeddings.weight``, ``layers.{i}.attn.q_proj.weight``, ...), e.g. from
            ``FullModelHFCheckpointer.load_checkpoint()["model"]`` or ``teacher.state_dict()``.
        layers (Sequence[int]): teacher layer for each student layer, ``len == len(student.layers)``
            (see :func:`select_layers`).
        copy_embeddings (bool): copy ``tok_embeddings`` (rows ``[:V_S]``, cols ``[:D_S]``). Default: True
        copy_output (bool): copy an untied ``output`` projection. Default: True
        copy_attention (bool): copy attention, per-head truncated. Default: True
        copy_mlp (bool): copy the MLPs (leading slices); False leaves the student's init. Default: False
        copy_norms (bool): copy norm scales/biases (leading slices). Default: True
        freeze_embeddings (bool): set ``requires_grad=False`` on the token embeddings (and on a tied
            output, which is the same tensor). Default: False
        teacher_num_heads (int | None): teacher query heads ``H_T``; ``None`` assumes the student's
            (all paper students keep the teacher's head count). The teacher head dim is then
            ``rows(q_proj) / H_T``. Default: None
        teacher_num_kv_heads (int | None): teacher KV heads; ``None`` derives them from ``k_proj``'s
            rows and the head dim. Default: None

    Returns:
        dict[str, list[str]]: ``{"copied": [...], "truncated": [...], "random": [...], "frozen": [...]}``,
        student parameter names; ``truncated`` lists those copied from a larger teacher tensor
        (they are also in ``copied``), ``random`` those left at the student's init.

    Raises:
        ValueError: wrong number of layers, a missing teacher key, or a student dim larger than the teacher's.
    """
    layers = list(layers)
    n_student = len(student.layers)
    if len(layers) != n_student:
        raise ValueError(f"got {len(layers)} teacher layers {layers} for a student with {n_student} layers")
    geo_s = _attn_geometry(student)
    t_heads = _teacher_geometry(teacher_state_dict, layers[0], geo_s, teacher_num_heads, teacher_num_kv_heads)
    report: dict[str, list[str]] = {"copied": [], "truncated": [], "random": [], "frozen": []}
    params = dict(student.named_parameters())
    for name, p in student.state_dict(keep_vars=True).items():
        if name not in params:  # buffers (RoPE caches) are rebuilt by the student itself
            continue
        m = _LAYER_RE.match(name)
        t_name = f"layers.{layers[int(m.group(1))]}.{m.group(2)}" if m else name
        sub = m.group(2) if m else name
        if sub.startswith("attn."):
            wanted = copy_attention
        elif sub.startswith("mlp."):
            wanted = copy_mlp
        elif sub.startswith("tok_embeddings"):
            wanted = copy_embeddings
        elif sub.startswith("output"):
            wanted = copy_output
        else:  # sa_norm, mlp_norm, sa_scale, mlp_scale, norm (final), layer norms
            wanted = copy_norms
        if not wanted:
            report["random"].append(name)
            continue
        if t_name == "output.weight" and t_name not in teacher_state_dict:
            t_name = "tok_embeddings.weight"  # a tied teacher's output projection is its embedding
        if t_name not in teacher_state_dict:
            raise ValueError(f"teacher state dict has no {t_name!r} (needed for student {name!r})")
        t = teacher_state_dict[t_name]
        if t.shape == p.shape:
            src = t
        elif sub.startswith("attn.") and sub.endswith(("_proj.weight", "_proj.bias", "_norm.scale")):
            src = _attn_slice(sub, t, t_heads, geo_s)
            report["truncated"].append(name)
        else:
            src = _leading_slice(t, p.shape)
            report["truncated"].append(name)
        if src.shape != p.shape:
            raise ValueError(f"{name}: sliced teacher tensor {tuple(src.shape)} != student {tuple(p.shape)}")
        p.copy_(src.to(dtype=p.dtype, device=p.device))
        report["copied"].append(name)
    if freeze_embeddings:
        student.tok_embeddings.weight.requires_grad_(False)
        report["frozen"].append("tok_embeddings.weight")
    return report


def _teacher_geometry(
    sd: dict[str, torch.Tensor], layer: int, geo_s, h_t: int | None, kv_t: int | None
) -> tuple[int, int, int, int, str]:
    """Teacher (heads, kv heads, head dim, hidden, rope layout) from its q/k shapes and the head count."""
    h_s, _, _, _, layout = geo_s
    q = sd[f"layers.{layer}.attn.q_proj.weight"]  # [H_T*d_T, D_T]
    k = sd[f"layers.{layer}.attn.k_proj.weight"]  # [KV_T*d_T, D_T]
    h_t = h_t or h_s
    if q.shape[0] % h_t:
        raise ValueError(f"teacher q_proj has {q.shape[0]} rows, not divisible by teacher_num_heads={h_t}")
    d_t = q.shape[0] // h_t
    kv_t = kv_t or k.shape[0] // d_t
    return h_t, kv_t, d_t, q.shape[1], layout


@torch.no_grad()
def reinit_(model: nn.Module, std: float = 0.02) -> None:
    """A sane from-scratch init for torchtune builders (which have none): N(0, std) for every matrix and
    embedding, zeros for biases, ones for norm scales/weights (GemmaRMSNorm's zero-centred scale: zeros)."""
    from torchtune.models.gemma.rms_norm import GemmaRMSNorm

    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, GemmaRMSNorm):
                p.zero_()
            elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) or name == "scale":
                p.fill_(1.0) if name in ("weight", "scale") else p.zero_()
            elif name == "bias":
                p.zero_()
            else:
                p.normal_(0.0, std)


def main(argv: list[str] | None = None) -> int:
    """``tad-tune init-student``: build a Table 8 student, initialise it from the teacher, write an HF dir."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="tad-tune init-student",
        description="Build the student of an experiment config (`model`), initialise it from the teacher "
        "(`teacher_model` + `teacher_checkpointer`) as the paper does for that student (Sec. 3.2: layer selection, "
        "per-head attention truncation, random MLPs, copied embeddings; tad_torchtune.models.students.STUDENT_INIT), "
        "or as an optional `student_init` section says, and write it as an HF directory: by default the "
        "student `checkpointer.checkpoint_dir`, which the recipe then loads.",
    )
    parser.add_argument("--config", required=True, help="experiment YAML (model, teacher_model, teacher_checkpointer)")
    parser.add_argument(
        "--out", default=None, help="output HF dir (default: student_init.output_dir, else checkpointer.checkpoint_dir)"
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="weights dtype written")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. teacher_dir=/models/x)")
    ns = parser.parse_args(argv)

    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from tad_torchtune.config_loader import load_config
    from tad_torchtune.models.export import export_hf
    from tad_torchtune.models.registry import resolve

    try:  # a path or a shipped name, overrides checked: the loader every command uses
        cfg = load_config(ns.config, ns.overrides)
    except (FileNotFoundError, ValueError) as err:
        print(f"tad-tune init-student: {err}", file=sys.stderr)
        return 1
    from tad_torchtune.models.students import STUDENT_INIT

    # defaults: the paper's settings for a named Table 8 student, else every other layer with random MLPs
    student_name = str(cfg.model._component_).rsplit(".", 1)[-1]
    si = dict(STUDENT_INIT.get(student_name, (None, {"layers": "every_other", "copy_mlp": False}))[1])
    si.pop("freeze_embeddings", None)  # freezing is the recipe's `freeze: [tok_embeddings]`
    si_given = OmegaConf.to_container(cfg.get("student_init", None) or OmegaConf.create({}), resolve=True)
    si.update(si_given)
    out = ns.out or si.pop("output_dir", None) or OmegaConf.select(cfg, "checkpointer.checkpoint_dir")
    si.pop("output_dir", None)
    if out is None:
        raise SystemExit("give --out, student_init.output_dir or checkpointer.checkpoint_dir in the config")
    spec = si.pop("layers", "every_other")
    init_std = float(si.pop("init_std", 0.02))
    tokenizer_dir = si.pop("tokenizer_dir", "teacher")  # null: write no tokenizer files
    if tokenizer_dir == "teacher":
        from tad_torchtune.models.export import TOKENIZER_FILES

        tokenizer_dir = cfg.teacher_checkpointer.get("checkpoint_dir")
        if not any((Path(tokenizer_dir) / f).is_file() for f in TOKENIZER_FILES):
            print(f"note: no tokenizer files in {tokenizer_dir}; the student dir gets none (lm-eval: tokenizer=...)")
            tokenizer_dir = None

    teacher_sd = tt_config.instantiate(cfg.teacher_checkpointer).load_checkpoint()["model"]
    n_teacher = 1 + max(int(k.split(".")[1]) for k in teacher_sd if k.startswith("layers."))
    _, t_args = resolve(OmegaConf.to_container(cfg.teacher_model, resolve=True))
    s_node = OmegaConf.to_container(cfg.model, resolve=True)
    family, s_args = resolve(s_node)
    student = tt_config.instantiate(cfg.model)
    reinit_(student, init_std)
    n_student = len(student.layers)
    if spec == "every_other" and len(select_layers(n_teacher, spec)) != n_student and "layers" not in si_given:
        spec = "uniform"  # a pretrained-shaped student (e.g. 28 layers from 36): spread its layers evenly
    layers = select_layers(n_teacher, spec, n_student)
    report = init_student_from_teacher(
        student,
        teacher_sd,
        layers,
        teacher_num_heads=t_args["num_heads"],
        teacher_num_kv_heads=t_args.get("num_kv_heads"),
        **si,
    )
    dtype = torch.bfloat16 if ns.dtype == "bf16" else torch.float32
    export_hf(student, family, s_args, out, tokenizer_dir, dtype=dtype)
    summary = {k: len(v) for k, v in report.items()}
    (Path(out) / "student_init_report.json").write_text(json.dumps({"layers": layers, **report}, indent=1))
    print(f"student ({family}, {len(layers)} layers from teacher layers {layers}) -> {out}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
