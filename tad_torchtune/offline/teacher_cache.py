"""A TAD-aware sparse teacher cache: its maths, its writer for the offline pass, its reader (``docs/teacher_cache.md``).

Per position of every item of the recipe's dataset the cache keeps what TAD and forward KL need from the teacher
(:class:`tad_torchtune.losses.sparse_teacher.SparseTeacher`): the top-``K_max`` ids and log-probabilities, the
log mass and ``Σ p log p`` of the tail beyond them, and ``M`` ids drawn from that renormalised tail.

It is written by the shared offline pass (:func:`tad_torchtune.offline.engine.run_pass`: fixed shards, atomic
files, manifest, exact resume, ``torchrun`` sharding) with :class:`SparseTeacherWriter` over a
:class:`DatasetSource` (instance ``i`` = item ``i`` of the dataset the recipe builds from the same config).
Shard arrays (positions of a shard's items concatenated; ``length`` splits them): ``top_ids [P, K_max]``
(uint16 when V <= 65536, else int32), ``top_logp [P, K_max]`` (fp32, or bf16 stored as its uint16 bits),
``tail_logmass [P]``, ``tail_plogp [P]`` (fp32), ``sample_ids [P, M]``, ``length [n]`` and ``checksum [n]`` (of each
item's tokens, checked when the recipe reads its rows), plus the pass's ``index [n]``. The draws of item ``i``
come from a generator seeded by ``(seed, i)``, so shards do not depend on batching, ranks or resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tad_torchtune.losses.sparse_teacher import SparseTeacher
from tad_torchtune.offline.engine import Batch

log = logging.getLogger(__name__)

KIND = "teacher_cache"  # the writer's kind in the pass manifest
INDEX_KEY = "cache_index"  # item key added by IndexedDataset
BATCH_KEY = "teacher_cache"  # batch key added by CacheCollate: a SparseTeacher of the batch's positions
_FINGERPRINT_SAMPLES = 256  # items hashed into the corpus fingerprint (plus the count)
_CHECKSUM_MAX_LEN = 1 << 22
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads item indices over seeds
_FIELDS = ("top_ids", "top_logp", "tail_logmass", "tail_plogp", "sample_ids")


class TeacherCacheError(ValueError):
    """A cache that is missing, incomplete or does not match the run (corpus, vocabulary, K, τ)."""


# ---------------------------------------------------------------------------------------------------------
# maths: logits -> records
def records_from_logits(
    logits: torch.Tensor,
    k_max: int,
    samples: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> SparseTeacher:
    """Cache records of positions from teacher logits.

    Args:
        logits (torch.Tensor): ``[..., V_T]`` teacher logits (any float dtype; computed in fp32).
        k_max (int): ids kept exactly per position, ``1 <= k_max <= V``.
        samples (int): ``m``, ids drawn with replacement from the renormalised tail beyond ``k_max``
            (``>= 1`` unless ``k_max == V``, then 0).
        generator (torch.Generator | None): source of the draws (on the logits' device).
        temperature (float): τ, divides the logits (the cache then serves losses at this τ only).
        vocab_size (int | None): the student's V; a teacher's extra vocabulary rows are cut before the
            softmax (docs/spec.md §3.6). Default: all of ``V_T``.

    Returns:
        SparseTeacher: fields shaped ``[..., K_max]``, ``[...]``, ``[...]``, ``[..., m]`` (int64 ids, fp32 values).
    """
    vocab = vocab_size or logits.size(-1)
    if not 1 <= k_max <= vocab:
        raise ValueError(f"k_max={k_max} must be in [1, V={vocab}]")
    if k_max < vocab and samples < 1:
        raise ValueError(f"samples={samples}: the tail beyond k_max={k_max} < V={vocab} needs at least one draw")
    if k_max == vocab and samples != 0:
        raise ValueError(f"k_max = V = {vocab} leaves no tail to sample: use samples=0")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.size(-1))[:, :vocab].float() / temperature
    logp = torch.log_softmax(flat, -1)
    top_logp, top_ids = logp.topk(k_max, dim=-1, sorted=True)
    p_far = logp.exp().scatter_(-1, top_ids, 0.0)
    # Sums over the tail entries themselves (no 1 − Σ top-K cancellation; docs/spec.md §3.5).
    alpha_f = p_far.sum(-1)
    plogp = torch.where(p_far > 0, p_far * logp, 0.0).sum(-1)
    if samples:
        empty = alpha_f <= 0  # the far tail underflowed: any far id will do, its weight α_F is 0
        if bool(empty.any()):
            far = torch.ones_like(p_far).scatter_(-1, top_ids, 0.0)
            p_far = torch.where(empty[:, None], far, p_far)
        sample_ids = torch.multinomial(p_far, samples, replacement=True, generator=generator)
    else:
        sample_ids = torch.zeros(flat.size(0), 0, dtype=torch.long, device=flat.device)
    return SparseTeacher(
        top_ids.reshape(*lead, k_max),
        top_logp.reshape(*lead, k_max),
        alpha_f.log().reshape(lead),
        plogp.reshape(lead),
        sample_ids.reshape(*lead, samples),
    )


def sequence_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of sequence ``index``'s draws: a function of ``(seed, index)`` only."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(index) * _SEED_MIX) % (1 << 63))
    return g


# ---------------------------------------------------------------------------------------------------------
# identities: corpus, sequence, model
_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def sequence_checksum(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` (or ``[L]``) int token ids -> ``[B]`` (or 0-d) int64 weighted sums with fixed pseudo-random
    weights in [1, 2^20): equal for equal sequences, different for another window, file or tokenizer (exact,
    no overflow, for ids < 2^21 and ``L <= 2^22``)."""
    length = tokens.size(-1)
    if length > _CHECKSUM_MAX_LEN:
        raise ValueError(f"sequence of {length} tokens is longer than the checksum supports ({_CHECKSUM_MAX_LEN})")
    key = (length, str(tokens.device))
    if key not in _WEIGHTS:
        g = torch.Generator().manual_seed(20260211)
        _WEIGHTS[key] = torch.randint(1, 1 << 20, (length,), generator=g).to(tokens.device)
    return (tokens.long() * _WEIGHTS[key]).sum(-1)


def corpus_fingerprint(dataset: Any) -> str:
    """sha256 over the number of items and the tokens and labels of up to 256 evenly spaced items.

    Cheap for any corpus size (a pass over every token of a 2B-token file would take minutes); a cache is
    also checked sequence by sequence against the batch's tokens (:func:`sequence_checksum`) as it is read.
    """
    n = len(dataset)
    h = hashlib.sha256(f"{KIND}:{n}".encode())
    step = max(1, n // _FINGERPRINT_SAMPLES)
    for i in range(0, n, step):
        item = dataset[i]
        for field in ("tokens", "labels"):
            h.update(field.encode() + torch.as_tensor(item.get(field, []), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# writing: a source and a writer for the shared offline pass
class DatasetSource:
    """The recipe's dataset as instances of the offline pass: instance ``i`` is item ``i``'s ``tokens``.

    Args:
        dataset: map-style, items with ``tokens`` (and ``labels``), e.g. from
            ``tad_torchtune.recipes.kd_tad.build_dataset`` on the training config.
        description (dict | None): recorded in the manifest (e.g. the dataset config).
    """

    def __init__(self, dataset: Any, description: dict[str, Any] | None = None):
        self.dataset = dataset
        self.description = dict(description or {})
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> np.ndarray:
        return np.asarray(self.dataset[index]["tokens"], dtype=np.int64)

    def identity(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = corpus_fingerprint(self.dataset)
        return {
            "kind": "recipe_dataset",
            "fingerprint": self._fingerprint,
            "num_instances": len(self),
            **self.description,
        }


def _id_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)


class SparseTeacherWriter:
    """Offline-pass writer (``kind = "teacher_cache"``): per position, the records of :func:`records_from_logits`.

    Args:
        forward: ``tokens [B, T] -> logits [B, T, V_T]`` (the teacher; e.g. ``offline.models.logits_of``).
        model_identity (dict): the teacher's fingerprint and description (recorded, part of the identity).
        vocab_size (int): the student's V (the teacher's extra rows are cut).
        k_max (int), samples (int), seed (int), temperature (float): see :func:`records_from_logits`.
        logprob_dtype (str): ``"fp32"`` (exact) or ``"bf16"`` (half the bytes, rounded; docs/teacher_cache.md).
    """

    kind = KIND

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        model_identity: dict[str, Any],
        *,
        vocab_size: int,
        k_max: int,
        samples: int,
        seed: int = 0,
        temperature: float = 1.0,
        logprob_dtype: str = "fp32",
    ):
        if logprob_dtype not in ("fp32", "bf16"):
            raise ValueError(f"logprob_dtype must be 'fp32' or 'bf16', got {logprob_dtype!r}")
        if not 1 <= k_max <= vocab_size:
            raise ValueError(f"k_max={k_max} must be in [1, V={vocab_size}]")
        if (k_max < vocab_size) != (samples >= 1) or samples < 0:
            raise ValueError(
                f"samples={samples} with k_max={k_max} and V={vocab_size}: the tail beyond k_max needs at least one "
                "draw, and k_max = V leaves none (samples=0)"
            )
        self.forward = forward
        self.settings = {
            "vocab_size": int(vocab_size),
            "k_max": int(k_max),
            "samples": int(samples),
            "seed": int(seed),
            "temperature": float(temperature),
            "logprob_dtype": logprob_dtype,
            "teacher": dict(model_identity),
        }

    def identity(self) -> dict[str, Any]:
        return dict(self.settings)

    def records(self, batch: Batch) -> dict[str, np.ndarray]:
        s = self.settings
        logits = self.forward(batch.tokens)
        lengths = batch.lengths.tolist()
        ids_dtype = _id_dtype(s["vocab_size"])
        parts: dict[str, list[np.ndarray]] = {k: [] for k in _FIELDS}
        sums = []
        for row, (index, length) in enumerate(zip(batch.indices.tolist(), lengths, strict=True)):
            g = sequence_generator(s["seed"], index, logits.device)
            rec = records_from_logits(
                logits[row, :length], s["k_max"], s["samples"], g, s["temperature"], s["vocab_size"]
            )
            for name, value in zip(_FIELDS, rec, strict=True):
                value = value.cpu()
                if name in ("top_ids", "sample_ids"):
                    parts[name].append(value.numpy().astype(ids_dtype))
                elif name == "top_logp" and s["logprob_dtype"] == "bf16":
                    parts[name].append(value.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
                else:
                    parts[name].append(value.float().numpy())
            sums.append(int(sequence_checksum(batch.tokens[row, :length].cpu())))
        out = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
        out["length"] = np.asarray(lengths, dtype=np.int64)
        out["checksum"] = np.asarray(sums, dtype=np.int64)
        return out


# ---------------------------------------------------------------------------------------------------------
# reading
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The settings of a complete cache folder: the writer's settings (``vocab_size``, ``k_max``, ``samples``,
    ``seed``, ``temperature``, ``logprob_dtype``, ``teacher``) plus ``num_sequences``, ``corpus_fingerprint``,
    ``shard_size``, ``num_shards``, ``identity_hash`` from the pass manifest.

    Raises:
        TeacherCacheError: missing folder, no manifest, an unfinished pass, another writer's pass, a missing shard.
    """
    from tad_torchtune.offline import engine

    root = Path(path)
    if not root.is_dir():
        raise TeacherCacheError(
            f"teacher cache {str(path)!r} is not a directory; write one with tad-tune teacher-cache"
        )
    try:
        manifest = engine.read_manifest(root)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        raise TeacherCacheError(f"teacher cache {str(path)!r}: {err}") from None
    identity = manifest.get("identity", {})
    if identity.get("writer") != KIND:
        raise TeacherCacheError(
            f"teacher cache {str(path)!r} holds an offline pass of kind {identity.get('writer')!r}, not a teacher cache"
        )
    if not manifest.get("complete"):
        missing = [i for i in range(manifest["num_shards"]) if not engine.shard_path(root, i).is_file()]
        raise TeacherCacheError(
            f"teacher cache {str(path)!r} is not complete ({len(missing)} of {manifest['num_shards']} shards missing): "
            "rerun the same tad-tune teacher-cache command to finish it"
        )
    for i in range(manifest["num_shards"]):
        if not engine.shard_path(root, i).is_file():
            raise TeacherCacheError(f"teacher cache {root}: shard {i} is missing")
    source = identity["source"]
    return {
        **identity["writer_settings"],
        "num_sequences": int(identity["num_instances"]),
        "corpus_fingerprint": source.get("fingerprint"),
        "shard_size": int(identity["shard_size"]),
        "num_shards": int(manifest["num_shards"]),
        "identity_hash": manifest["identity_hash"],
    }


def check_compatible(
    manifest: dict[str, Any],
    *,
    vocab_size: int | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    corpus: str | None = None,
    num_sequences: int | None = None,
    where: str = "teacher_cache: ",
) -> None:
    """Refuses a cache that cannot serve a run (one message naming the mismatch and the fix).

    Raises:
        TeacherCacheError: vocabulary, K > K_max, τ, number of sequences or corpus fingerprint differ.
    """
    fix = "write a cache for this config with tad-tune teacher-cache"  # `where` prefixes every message
    if vocab_size is not None and manifest["vocab_size"] != vocab_size:
        raise TeacherCacheError(
            f"{where}the cache was written for a vocabulary of {manifest['vocab_size']}, the student has "
            f"{vocab_size}; {fix}"
        )
    if top_k is not None and top_k > manifest["k_max"]:
        raise TeacherCacheError(
            f"{where}kd_loss.top_k={top_k} exceeds the cache's k_max={manifest['k_max']}; lower top_k or {fix} "
            f"--k-max {top_k} (or more)"
        )
    if temperature is not None and abs(float(temperature) - manifest["temperature"]) > 1e-12:
        raise TeacherCacheError(
            f"{where}kd_loss.temperature={temperature} but the cache holds the teacher at temperature "
            f"{manifest['temperature']}; {fix}"
        )
    if num_sequences is not None and num_sequences != manifest["num_sequences"]:
        raise TeacherCacheError(
            f"{where}the dataset has {num_sequences} sequences, the cache {manifest['num_sequences']}: it was "
            f"written for another corpus (or max_seq_len / max_tokens); {fix}"
        )
    if corpus is not None and corpus != manifest["corpus_fingerprint"]:
        raise TeacherCacheError(
            f"{where}the dataset's fingerprint {corpus[:12]}... differs from the cache's "
            f"{manifest['corpus_fingerprint'][:12]}...: it was written for another corpus; {fix}"
        )


class TeacherCache:
    """Reads a cache directory: the rows of any sequences, padded into a :class:`SparseTeacher` batch.

    Shards are opened lazily and memory-mapped (safetensors), so only the rows read are paged in.

    Args:
        path (str | Path): the cache directory.

    Raises:
        TeacherCacheError: see :func:`read_manifest`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.k_max = int(self.manifest["k_max"])
        self.samples = int(self.manifest["samples"])
        self._bf16 = self.manifest["logprob_dtype"] == "bf16"
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}  # open shard handles stay in their process
        return state

    def _shard(self, i: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        if i not in self._open:
            from safetensors import safe_open

            from tad_torchtune.offline.engine import shard_path

            f = safe_open(str(shard_path(self.path, i)), framework="pt")
            meta = json.loads((f.metadata() or {}).get("tad_torchtune", "{}"))
            if meta.get("identity_hash") != self.manifest["identity_hash"]:
                raise TeacherCacheError(f"{shard_path(self.path, i)} belongs to another pass than {self.path}")
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), f.get_tensor("length").cumsum(0)])
            self._open[i] = (f, offsets, f.get_tensor("checksum"))
        return self._open[i]

    def sequence(self, index: int) -> tuple[SparseTeacher, int]:
        """Records ``[L, ...]`` of item ``index`` (int64 ids, fp32 values) and its token checksum."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for a cache of {len(self)}")
        shard, j = divmod(index, self.manifest["shard_size"])
        f, offsets, checksum = self._shard(shard)
        a, b = int(offsets[j]), int(offsets[j + 1])
        rows = [f.get_slice(k)[a:b] for k in _FIELDS]
        logp = rows[1].view(torch.int16).view(torch.bfloat16) if self._bf16 else rows[1]
        rec = SparseTeacher(
            rows[0].to(torch.int64), logp.float(), rows[2].float(), rows[3].float(), rows[4].to(torch.int64)
        )
        return rec, int(checksum[j])

    def batch(
        self, indices: Iterable[int], tokens: torch.Tensor, device: torch.device | str | None = None
    ) -> SparseTeacher:
        """The rows of sequences ``indices`` aligned with a right-padded ``[B, S]`` ``tokens`` batch.

        Positions past a sequence's cached length get neutral rows (their labels are ignored by the loss).

        Raises:
            TeacherCacheError: a sequence's tokens differ from those the cache was written from (data order
                or corpus changed).
        """
        indices = list(indices)
        batch, seq = tokens.shape
        k, m = self.k_max, self.samples
        out = SparseTeacher(
            torch.arange(k).expand(batch, seq, k).clone(),
            torch.full((batch, seq, k), -float(torch.tensor(float(k)).log())),
            torch.full((batch, seq), float("-inf")),
            torch.zeros(batch, seq),
            torch.zeros(batch, seq, m, dtype=torch.long),
        )
        sums = []
        lengths = []
        for row, i in enumerate(indices):
            rec, checksum = self.sequence(int(i))
            length = rec.top_ids.size(0)
            if length > seq:
                raise TeacherCacheError(
                    f"cached sequence {i} has {length} positions but the batch only {seq}: another corpus or "
                    "max_seq_len; write a cache for this config"
                )
            for dst, src in zip(out, rec, strict=True):
                dst[row, :length] = src
            sums.append(checksum)
            lengths.append(length)
        cpu_tokens = tokens.detach().cpu()
        for row, (i, length, expected) in enumerate(zip(indices, lengths, sums, strict=True)):
            if int(sequence_checksum(cpu_tokens[row, :length])) != expected:
                raise TeacherCacheError(
                    f"the tokens of dataset item {i} differ from those the teacher cache {self.path} was written "
                    "from (another corpus, tokenizer or max_seq_len); write a cache for this config"
                )
        return SparseTeacher(*[t.to(device) for t in out]) if device is not None else out


def bytes_per_position(vocab_size: int, k_max: int, samples: int, logprob_dtype: str = "fp32") -> int:
    """Bytes one position takes in a shard (ids, log-probs, the two tail scalars, the draws)."""
    id_bytes = _id_dtype(vocab_size).itemsize
    lp_bytes = 2 if logprob_dtype == "bf16" else 4
    return k_max * (id_bytes + lp_bytes) + 8 + samples * id_bytes


# ---------------------------------------------------------------------------------------------------------
# the recipe's side: items carry their dataset index, batches their cached rows
class IndexedDataset(torch.utils.data.Dataset):
    """``dataset[i]`` plus ``{INDEX_KEY: i}``: the sampler's index travels with the item to the collate."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], INDEX_KEY: int(index)}


class CacheCollate:
    """Wraps a collate function: strips the items' indices, collates, and adds the batch's cached rows under
    ``BATCH_KEY`` (read and checked on the data-loading side, in CPU memory, pinned with the batch)."""

    def __init__(self, collate: Callable[[list[dict]], dict[str, Any]], cache: TeacherCache):
        self.collate = collate
        self.cache = cache

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [it[INDEX_KEY] for it in items]
        batch = self.collate([{k: v for k, v in it.items() if k != INDEX_KEY} for it in items])
        batch[BATCH_KEY] = self.cache.batch(indices, batch["tokens"])
        return batch
