"""An lm-evaluation-harness model around a torchtune ``TransformerDecoder``: offline, no HFLM, no hub.

torchtune 0.6.1's ``eleuther_eval`` recipe subclasses ``HFLM`` (which downloads ``gpt2`` at construction),
refuses lm-eval >= 0.4.10 and ignores the tasks' ``max_gen_toks``. :class:`TorchtuneLM` is a small
:class:`lm_eval.api.model.TemplateLM` instead. It follows lm-eval's tokenisation conventions (trailing
context spaces move into the continuation; continuation tokens are ``encode(ctx + cont)[len(encode(ctx)):]``;
an empty context is conditioned on ``prefix_token_id``; rolling windows use ``get_rolling_token_windows``),
which is what makes its per-request log-likelihoods equal HFLM's on the same weights (tested to 1e-4).

Generation is greedy only (the paper's protocol), batched with left padding and a KV cache
(torchtune's ``local_kv_cache``), and stops at the tokenizer's stop tokens, at ``max_gen_toks`` or when
every row contains one of the request's ``until`` strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import local_kv_cache
from tqdm import tqdm

from tad_torchtune.eval.logit_chunks import as_chunks

__all__ = ["TorchtuneLM"]


def _logits(out: object) -> torch.Tensor:
    chunks = as_chunks(out)
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


class TorchtuneLM(TemplateLM):
    """lm-eval model for a torchtune decoder and tokenizer.

    Args:
        model (torch.nn.Module): a torchtune ``TransformerDecoder`` (weights loaded); called as
            ``model(tokens [B, S], mask=..., input_pos=...)`` returning ``[B, S, V]`` logits or a list of chunks.
        tokenizer: a torchtune tokenizer: ``encode(text, add_bos, add_eos) -> list[int]``, ``decode(ids) -> str``,
            ``eos_id``; optional ``bos_id``, ``pad_id``, ``stop_tokens``.
        device (str | torch.device): where the model runs. Default: "cpu"
        batch_size (int): requests per forward pass. Default: 8
        max_seq_len (int | None): context window for scoring and generation; defaults to ``model.max_seq_len``.
        max_gen_toks (int): generated tokens when a task does not set ``max_gen_toks``. Default: 256
        enable_kv_cache (bool): use a KV cache when generating. Default: True
        add_bos (bool | None): prepend BOS to every encoded string (as HFLM does for tokenizers that add it,
            e.g. Llama's). None leaves it to the tokenizer's own behaviour. Default: None
        prefix_token_id (int | None): token conditioning empty contexts and rolling windows; defaults to BOS,
            else EOS (HFLM's rule).

    Example:
        >>> lm = TorchtuneLM(model, tokenizer, device="cuda", batch_size=16)
        >>> lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], num_fewshot=25)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        max_seq_len: int | None = None,
        max_gen_toks: int = 256,
        enable_kv_cache: bool = True,
        add_bos: bool | None = None,
        prefix_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        self.batch_size = int(batch_size)
        model_max = getattr(model, "max_seq_len", None)
        self.max_length = int(max_seq_len or model_max or 2048)
        if model_max is not None and self.max_length > model_max:
            raise ValueError(
                f"max_seq_len={self.max_length} exceeds the model's max_seq_len={model_max} (its RoPE cache); "
                "lower max_seq_len or build the model with a larger max_seq_len"
            )
        self.max_gen_toks = int(max_gen_toks)
        self.enable_kv_cache = enable_kv_cache
        self.add_bos = add_bos
        if getattr(tokenizer, "eos_id", None) is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_id; lm-eval needs an end-of-text id")
        self._eos_id = int(tokenizer.eos_id)
        bos = getattr(tokenizer, "bos_id", None)
        self._prefix_token_id = prefix_token_id if prefix_token_id is not None else (bos if bos is not None else None)
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = int(pad) if pad is not None else self._eos_id  # never attended to: masked or right of the target
        self.stop_ids = sorted({int(t) for t in (getattr(tokenizer, "stop_tokens", None) or [])} | {self._eos_id})

    # --------------------------------------------------------------------------------------- TemplateLM API
    @property
    def eot_token_id(self) -> int:
        return self._eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id if self._prefix_token_id is not None else self._eos_id

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add_bos = bool(self.add_bos) if add_special_tokens is None else bool(add_special_tokens and self.add_bos)
        return list(self.tokenizer.encode(string, add_bos=add_bos, add_eos=False))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # --------------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs and greedy flag for ``(context_ids, continuation_ids)`` pairs (one batch)."""
        inps, spans = [], []
        for ctx, cont in pairs:
            # Keep the last max_length+1 tokens; the model sees all but the last one (HFLM's truncation).
            full = (ctx + cont)[-(self.max_length + 1) :]
            inps.append(full[:-1])
            spans.append(min(len(cont), len(full) - 1))
        width = max(len(x) for x in inps)
        x = torch.full((len(inps), width), self.pad_id, dtype=torch.long)
        for i, inp in enumerate(inps):
            x[i, : len(inp)] = torch.tensor(inp, dtype=torch.long)  # right padding: causal rows ignore it
        logits = _logits(self.model(x.to(self._device)))
        out = []
        for i, ((_, cont), n) in enumerate(zip(pairs, spans, strict=True)):
            end = len(inps[i])
            lp = F.log_softmax(logits[i, end - n : end].float(), dim=-1)  # [n, V]
            tgt = torch.tensor(cont[len(cont) - n :], dtype=torch.long, device=lp.device)  # n=0: scores 0, greedy
            out.append((float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())))
        return out

    def _score_all(self, pairs: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool) -> list:
        # Longest first: padding waste stays small and an out-of-memory error shows up at once.
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        res: list = [None] * len(pairs)
        for s in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=disable_tqdm):
            idx = order[s : s + self.batch_size]
            for i, r in zip(idx, self._score([pairs[i] for i in idx]), strict=True):
                res[i] = r
        return res

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        res = self._score_all([(ctx, cont) for _, ctx, cont in requests], "loglikelihood", disable_tqdm)
        for (key, _, _), r in zip(requests, res, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for j, req in enumerate(requests):
            (string,) = req.args
            for w in get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(make_disjoint_window(w))
                owner.append(j)
        scores = self._score_all(windows, "loglikelihood_rolling", disable_tqdm)
        totals = [0.0] * len(requests)
        for j, (s, _) in zip(owner, scores, strict=True):
            totals[j] += s
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --------------------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Greedy-decode a batch of prompts (left padded); returns each row's tokens before its first stop id."""
        bsz, width = len(prompts), max(len(p) for p in prompts)
        total = width + max_new
        dev = self._device
        x = torch.full((bsz, width), self.pad_id, dtype=torch.long)
        pad_mask = torch.ones((bsz, total), dtype=torch.bool)
        for i, p in enumerate(prompts):
            x[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            pad_mask[i, : width - len(p)] = False
        x, pad_mask = x.to(dev), pad_mask.to(dev)
        masks = get_causal_mask_from_padding_mask(pad_mask, target_seq_len=total)  # [B, total, total]
        pos = get_position_ids_from_padding_mask(pad_mask)  # [B, total]
        stop = torch.tensor(self.stop_ids, device=dev)
        done = torch.zeros(bsz, dtype=torch.bool, device=dev)
        gen: list[torch.Tensor] = []

        def step(cached: bool) -> torch.Tensor:
            cur = width + len(gen)
            if cached and gen:  # only the newest token; the cache holds the rest
                out = self.model(gen[-1][:, None], input_pos=pos[:, cur - 1 : cur], mask=masks[:, cur - 1 : cur])
            elif cached:
                out = self.model(x, input_pos=pos[:, :cur], mask=masks[:, :cur])
            else:
                seq = torch.cat([x, torch.stack(gen, 1)], 1) if gen else x
                out = self.model(seq, input_pos=pos[:, :cur], mask=masks[:, :cur, :cur])
            return _logits(out)[:, -1]

        def run(cached: bool) -> None:
            nonlocal done
            for _ in range(max_new):
                nxt = step(cached).argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
                gen.append(nxt)
                done = done | torch.isin(nxt, stop)
                if until and len(gen) % 4 == 0:  # a stop string in every row also ends the batch
                    texts = [self.tok_decode(r) for r in self._cut(torch.stack(gen, 1).tolist())]
                    done = done | torch.tensor([any(u in t for u in until) for t in texts], device=dev)
                if bool(done.all()):
                    break

        if self.enable_kv_cache:
            dtype = next(self.model.parameters()).dtype
            with local_kv_cache(self.model, batch_size=bsz, device=dev, dtype=dtype, decoder_max_seq_len=total):
                run(True)
        else:
            run(False)
        return self._cut(torch.stack(gen, 1).tolist() if gen else [[] for _ in prompts])

    def _cut(self, rows: list[list[int]]) -> list[list[int]]:
        stops = set(self.stop_ids)
        out = []
        for row in rows:
            keep = []
            for t in row:
                if t in stops:
                    break
                keep.append(t)
            out.append(keep)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one batch never mixes generation settings
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        pbar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for idxs in groups.values():
            kw = dict(requests[idxs[0]].args[1])
            if kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0.0:
                raise ValueError(
                    f"TorchtuneLM decodes greedily only (the paper's protocol); the task asked for {kw}. "
                    "Set do_sample: false / temperature: 0 in the task's generation_kwargs"
                )
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_seq_len={self.max_length}")
            idxs = sorted(idxs, key=lambda i: -len(requests[i].args[0]))
            for s in range(0, len(idxs), self.batch_size):
                chunk = idxs[s : s + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in chunk]
                for i, ids in zip(chunk, self._greedy(prompts, max_new, until), strict=True):
                    text = self.tok_decode(ids)
                    for u in until:  # cut at the first occurrence of each stop string
                        text = text.split(u)[0]
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                pbar.update(len(chunk))
        pbar.close()
        return res
