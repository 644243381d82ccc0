"""Model-output helpers: ``tensor_split`` chunked logits and hidden-state capture for the cosine loss."""

from __future__ import annotations

import types

import torch
from torch import nn


def _tensor_split_chunked_output(self: nn.Module, last_hidden_state: torch.Tensor) -> list[torch.Tensor]:
    # Always exactly ``num_output_chunks`` calls of ``output`` (some may be empty when S < n), so every
    # FSDP rank makes the same calls whatever its padded length (torchtune PR #2560; 0.6.1 uses chunk).
    return [self.output(c) for c in last_hidden_state.tensor_split(self.num_output_chunks, dim=1)]


def use_tensor_split_output(model: nn.Module, num_output_chunks: int) -> None:
    """Makes a torchtune ``TransformerDecoder`` return ``num_output_chunks`` logit chunks cut by ``tensor_split``.

    The chunks keep the model dtype (``[B, S_c, V]``); empty chunks (``S < n``) are kept so every rank calls
    the output projection the same number of times; drop them before the loss with :func:`non_empty`.

    Args:
        model (nn.Module): a ``TransformerDecoder`` (anything with ``output`` and ``num_output_chunks``).
        num_output_chunks (int): pieces along the sequence; 0 turns chunking off (full fp32 logits).
    """
    if not hasattr(model, "set_num_output_chunks"):
        raise TypeError(f"expected a torchtune TransformerDecoder, got {type(model).__name__}")
    model.set_num_output_chunks(int(num_output_chunks))
    # An instance attribute shadows the class method; FSDP2's dynamic subclass keeps instance attributes.
    model.chunked_output = types.MethodType(_tensor_split_chunked_output, model)


def non_empty(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drops empty ``[B, 0, V]`` chunks (sequence shorter than the number of chunks)."""
    return [c for c in chunks if c.size(1) > 0]


class HiddenStateCapture:
    """Records the outputs of chosen transformer layers during a forward (forward hooks).

    Register *after* activation checkpointing and FSDP wrapping, on the module then at ``model.layers[i]``,
    so a checkpointed layer's recomputation in backward does not record again.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder``.
        layers (list[int]): layer indices (negative counts from the end: -1 is the last layer's output,
            the final hidden state before the output norm).

    Example:
        >>> cap = HiddenStateCapture(model, [-1]); model(tokens); h = cap.pop()  # [h_last] of [B, S, D]
    """

    def __init__(self, model: nn.Module, layers: list[int]):
        n = len(model.layers)
        self.indices = []
        for i in layers:
            j = int(i) + n if int(i) < 0 else int(i)
            if not 0 <= j < n:
                raise ValueError(f"hidden layer index {i} is out of range for a model with {n} layers")
            self.indices.append(j)
        self._store: dict[int, torch.Tensor] = {}
        self._handles = []
        for j in sorted(set(self.indices)):
            self._handles.append(model.layers[j].register_forward_hook(self._hook(j)))

    def _hook(self, j: int):
        def hook(module: nn.Module, args, output):
            self._store[j] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def pop(self) -> list[torch.Tensor]:
        """The captured states in the order of ``layers`` (each ``[B, S, D]``); clears the store."""
        missing = [j for j in self.indices if j not in self._store]
        if missing:
            raise RuntimeError(f"no hidden state captured for layers {missing}; run a forward first")
        out = [self._store[j] for j in self.indices]
        self._store.clear()
        return out

    def remove(self) -> None:
        """Removes the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()


def cosine_distance_sum(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over valid positions of ``1 - cos(h_S, h_T)`` (the paper's hidden-state term, Table 4 runs).

    Args:
        student (torch.Tensor): ``[B, S, D]`` student hidden states.
        teacher (torch.Tensor): ``[B, S, D]`` teacher hidden states (no grad).
        valid (torch.Tensor): ``[B, S]`` bool, positions that count.

    Returns:
        torch.Tensor: 0-d fp32 sum (divide by the step's token count outside).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"hidden states must have the same shape for the cosine loss, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}; map layers of equal width (hidden_layer_map) or set cosine_weight: 0"
        )
    cos = nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    return torch.where(valid, 1.0 - cos, torch.zeros((), dtype=cos.dtype, device=cos.device)).sum()
