"""A TAD-aware sparse teacher cache: format, writer and reader (maths and measurements: ``docs/teacher_cache.md``).

Per position of every sequence of a dataset the cache keeps what TAD and forward KL need from the teacher
(:class:`tad_torchtune.losses.sparse_teacher.SparseTeacher`): the top-``K_max`` ids and log-probabilities,
the log mass and ``Σ p log p`` of the tail beyond them, and ``m`` ids drawn from that renormalised tail.

Layout of a cache directory::

    manifest.json              settings, corpus fingerprint, model hash, shard list; written last
    shard_00000.safetensors    sequences [0, n) of the dataset; fields below, positions of all sequences
    shard_00001.safetensors    concatenated (sequence i's rows are offsets[i]:offsets[i+1] of its shard)
    ...

Shard fields: ``top_ids [P, K_max]`` (uint16 when V <= 65536, else int32), ``top_logp [P, K_max]`` (fp32, or
bf16 on request), ``tail_logmass [P]``, ``tail_plogp [P]`` (fp32), ``sample_ids [P, m]``, ``offsets [n + 1]``
int64, ``checksum [n]`` int64 (of each sequence's tokens, checked when the recipe reads its rows). Every file
is written under a temporary name and renamed when complete, so a crash never leaves a file that looks
complete; a rerun with the same settings keeps the finished shards and writes the rest. Sampling uses one
generator per sequence seeded from ``(seed, sequence index)``, so shards do not depend on batching or resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from tad_torchtune.losses.sparse_teacher import SparseTeacher

log = logging.getLogger(__name__)

FORMAT = "tad_torchtune.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_KEY = "cache_index"  # item key added by IndexedDataset
BATCH_KEY = "teacher_cache"  # batch key added by CacheCollate: a SparseTeacher of the batch's positions
_FINGERPRINT_SAMPLES = 256  # sequences hashed into the corpus fingerprint (plus the count)
_CHECKSUM_MAX_LEN = 1 << 22
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads sequence indices over seeds


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
    weights: equal for equal sequences, different for a different order/window/file (no overflow for
    ids < 2^31 and L < 2^12 ... 2^22)."""
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
    h = hashlib.sha256(f"{FORMAT}:{n}".encode())
    step = max(1, n // _FINGERPRINT_SAMPLES)
    for i in range(0, n, step):
        item = dataset[i]
        for field in ("tokens", "labels"):
            h.update(torch.as_tensor(item[field], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def model_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# writing
def _id_dtype(vocab: int) -> torch.dtype:
    return torch.uint16 if vocab <= 1 << 16 else torch.int32


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


class CacheWriter:
    """Accumulates per-sequence records and writes fixed-size shards (``sequences_per_shard`` sequences).

    ``settings`` (vocab_size, k_max, samples, seed, temperature, logprob_dtype, corpus_fingerprint,
    num_sequences, model_hash, ...) go into the manifest. Shards already on disk from an earlier run with the
    same settings are kept (:meth:`done_sequences` tells the caller where to start).
    """

    def __init__(self, out_dir: str | Path, settings: dict[str, Any], sequences_per_shard: int = 256):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if sequences_per_shard < 1:
            raise ValueError(f"sequences_per_shard must be >= 1, got {sequences_per_shard}")
        if settings["logprob_dtype"] not in ("fp32", "bf16"):
            raise ValueError(f"logprob_dtype must be 'fp32' or 'bf16', got {settings['logprob_dtype']!r}")
        self.settings = dict(settings, sequences_per_shard=int(sequences_per_shard))
        self.per_shard = int(sequences_per_shard)
        self._pending: list[tuple[int, SparseTeacher, torch.Tensor]] = []
        started = self.out / "settings.json"
        if (self.out / MANIFEST).exists() or (started.exists() and json.loads(started.read_text()) != self.settings):
            raise TeacherCacheError(
                f"{self.out} already holds a teacher cache "
                f"{'(complete)' if (self.out / MANIFEST).exists() else 'with other settings'}; "
                "choose another --out or delete it"
            )
        _atomic_write_json(started, self.settings)
        self.shards: list[dict[str, Any]] = []
        i = 0
        while (self.out / _shard_name(i)).exists():  # complete shards of an interrupted run (atomic renames)
            count = min(self.per_shard, self.settings["num_sequences"] - i * self.per_shard)
            self.shards.append({"file": _shard_name(i), "first": i * self.per_shard, "count": count})
            i += 1

    def done_sequences(self) -> int:
        """Sequences already in complete shards (a resumed run starts here)."""
        return sum(s["count"] for s in self.shards)

    def add(self, index: int, records: SparseTeacher, tokens: torch.Tensor) -> None:
        """Adds sequence ``index`` (``[L, ...]`` records, ``[L]`` tokens); indices must come in order."""
        expected = self.done_sequences() + len(self._pending)
        if index != expected:
            raise ValueError(f"sequence {index} added out of order (expected {expected})")
        self._pending.append((index, SparseTeacher(*[t.detach().cpu() for t in records]), tokens.detach().cpu()))
        if len(self._pending) == self.per_shard:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        ids_dtype = _id_dtype(self.settings["vocab_size"])
        lp_dtype = torch.bfloat16 if self.settings["logprob_dtype"] == "bf16" else torch.float32
        recs = [r for _, r, _ in self._pending]
        lengths = torch.tensor([r.top_ids.size(0) for r in recs])
        fields = {
            "top_ids": torch.cat([r.top_ids for r in recs]).to(torch.int32).to(ids_dtype),
            "top_logp": torch.cat([r.top_logp for r in recs]).to(lp_dtype),
            "tail_logmass": torch.cat([r.tail_logmass for r in recs]).float(),
            "tail_plogp": torch.cat([r.tail_plogp for r in recs]).float(),
            "sample_ids": torch.cat([r.sample_ids for r in recs]).to(torch.int32).to(ids_dtype),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "checksum": torch.stack([sequence_checksum(t) for _, _, t in self._pending]),
        }
        i = len(self.shards)
        path = self.out / _shard_name(i)
        tmp = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in fields.items()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.shards.append({"file": path.name, "first": self._pending[0][0], "count": len(self._pending)})
        self._pending = []

    def finish(self) -> Path:
        """Writes the last shard and the manifest (last, atomically); returns the manifest's path."""
        self._flush()
        if self.done_sequences() != self.settings["num_sequences"]:
            raise ValueError(f"cache holds {self.done_sequences()} of {self.settings['num_sequences']} sequences")
        positions = 0
        for s in self.shards:
            from safetensors import safe_open

            with safe_open(str(self.out / s["file"]), framework="pt") as f:
                s["positions"] = int(f.get_slice("offsets")[-1:][0])
                positions += s["positions"]
            s["bytes"] = (self.out / s["file"]).stat().st_size
        manifest = dict(self.settings, format=FORMAT, version=VERSION, completed=True, shards=self.shards)
        manifest["num_positions"] = positions
        manifest["bytes"] = sum(s["bytes"] for s in self.shards)
        path = self.out / MANIFEST
        _atomic_write_json(path, manifest)
        (self.out / "settings.json").unlink(missing_ok=True)
        return path


def write_teacher_cache(
    teacher: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    dataset: Any,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    vocab_size: int,
    k_max: int,
    samples: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 8,
    sequences_per_shard: int = 256,
    logprob_dtype: str = "fp32",
    model_id: str = "",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Path:
    """Single-process writer: runs ``teacher`` over every item of ``dataset`` in index order and writes a cache.

    Args:
        teacher: ``batch -> [B, S, V_T]`` logits (a model's forward on ``tokens`` and its ``mask``/``input_pos``).
        dataset: map-style, items with ``tokens`` (and ``labels``); the cache is keyed by its item indices.
        collate: items -> a batch dict with ``tokens [B, S]`` (right-padded).
        out_dir: the cache directory (resumed when it holds complete shards of the same settings).
        vocab_size, k_max, samples, seed, temperature, sequences_per_shard, logprob_dtype: see the module and
            :func:`records_from_logits`.
        model_id: the teacher's identity for the manifest (:func:`model_hash`).

    Returns:
        Path: the manifest.
    """
    n = len(dataset)
    settings = {
        "vocab_size": int(vocab_size),
        "k_max": int(k_max),
        "samples": int(samples),
        "seed": int(seed),
        "temperature": float(temperature),
        "logprob_dtype": logprob_dtype,
        "num_sequences": n,
        "corpus_fingerprint": corpus_fingerprint(dataset),
        "model_hash": model_id,
    }
    writer = CacheWriter(out_dir, settings, sequences_per_shard)
    start = writer.done_sequences()
    if start:
        log.info(f"teacher cache: resuming after {start} sequences in complete shards")
    t0, tokens_done = time.perf_counter(), 0
    from tqdm import tqdm

    bar = tqdm(total=n, initial=start, unit="seq", disable=not progress)
    for first in range(start, n, batch_size):
        idx = list(range(first, min(first + batch_size, n)))
        items = [dataset[i] for i in idx]
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(items).items()}
        with torch.no_grad():
            logits = teacher(batch)
        for row, (i, item) in enumerate(zip(idx, items, strict=True)):
            length = len(item["tokens"])
            g = sequence_generator(seed, i, logits.device)
            recs = records_from_logits(logits[row, :length], k_max, samples, g, temperature, vocab_size)
            writer.add(i, recs, batch["tokens"][row, :length])
            tokens_done += length
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    return writer.finish()


# ---------------------------------------------------------------------------------------------------------
# reading
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache directory.

    Raises:
        TeacherCacheError: missing directory, no manifest (never written or interrupted), foreign format.
    """
    root = Path(path)
    if not root.is_dir():
        raise TeacherCacheError(
            f"teacher_cache={str(path)!r} is not a directory; write one with tad-tune teacher-cache"
        )
    mpath = root / MANIFEST
    if not mpath.exists():
        hint = (
            " (an interrupted write: rerun the same command to finish it)" if (root / "settings.json").exists() else ""
        )
        raise TeacherCacheError(f"teacher_cache={str(path)!r} has no {MANIFEST}{hint}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise TeacherCacheError(f"{mpath} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT or not manifest.get("completed"):
        raise TeacherCacheError(f"{mpath} is not a complete {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise TeacherCacheError(f"{mpath} has format version {manifest.get('version')}; this version reads {VERSION}")
    for s in manifest["shards"]:
        if not (root / s["file"]).exists():
            raise TeacherCacheError(f"teacher cache {root} lists {s['file']}, which is missing")
    return manifest


def check_compatible(
    manifest: dict[str, Any],
    *,
    vocab_size: int | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    corpus: str | None = None,
    num_sequences: int | None = None,
    where: str = "teacher_cache",
) -> None:
    """Refuses a cache that cannot serve a run (one message naming the mismatch and the fix).

    Raises:
        TeacherCacheError: vocabulary, K > K_max, τ, number of sequences or corpus fingerprint differ.
    """
    fix = "write a cache for this config with tad-tune teacher-cache"
    if vocab_size is not None and manifest["vocab_size"] != vocab_size:
        raise TeacherCacheError(
            f"{where}: the cache was written for a vocabulary of {manifest['vocab_size']}, the student has "
            f"{vocab_size}; {fix}"
        )
    if top_k is not None and top_k > manifest["k_max"]:
        raise TeacherCacheError(
            f"{where}: kd_loss.top_k={top_k} exceeds the cache's k_max={manifest['k_max']}; lower top_k or {fix} "
            f"with --k-max >= {top_k}"
        )
    if temperature is not None and abs(float(temperature) - manifest["temperature"]) > 1e-12:
        raise TeacherCacheError(
            f"{where}: kd_loss.temperature={temperature} but the cache holds the teacher at temperature "
            f"{manifest['temperature']}; {fix}"
        )
    if num_sequences is not None and num_sequences != manifest["num_sequences"]:
        raise TeacherCacheError(
            f"{where}: the dataset has {num_sequences} sequences, the cache {manifest['num_sequences']}: it was "
            f"written for another corpus (or max_seq_len / max_tokens); {fix}"
        )
    if corpus is not None and corpus != manifest["corpus_fingerprint"]:
        raise TeacherCacheError(
            f"{where}: the dataset's fingerprint {corpus[:12]}... differs from the cache's "
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
        self._firsts = [s["first"] for s in self.manifest["shards"]]
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}  # open shard handles stay in their process
        return state

    def _shard(self, i: int) -> Any:
        if i not in self._open:
            from safetensors import safe_open

            f = safe_open(str(self.path / self.manifest["shards"][i]["file"]), framework="pt")
            self._open[i] = (f, f.get_tensor("offsets"), f.get_tensor("checksum"))
        return self._open[i]

    def sequence(self, index: int) -> tuple[SparseTeacher, int]:
        """Records ``[L, ...]`` of sequence ``index`` (int64 ids, fp32 values) and its token checksum."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for a cache of {len(self)}")
        import bisect

        s = bisect.bisect_right(self._firsts, index) - 1
        f, offsets, checksum = self._shard(s)
        j = index - self._firsts[s]
        a, b = int(offsets[j]), int(offsets[j + 1])
        rows = [f.get_slice(k)[a:b] for k in ("top_ids", "top_logp", "tail_logmass", "tail_plogp", "sample_ids")]
        rec = SparseTeacher(
            rows[0].to(torch.int64), rows[1].float(), rows[2].float(), rows[3].float(), rows[4].to(torch.int64)
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
    id_bytes = 2 if vocab_size <= 1 << 16 else 4
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
