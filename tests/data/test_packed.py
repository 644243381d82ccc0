"""Packed windows over token files, driven by the recipe's torchdata sampler and loader."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune.data import padded_collate_sft

from tad_torchtune.data import PackedTokenDataset, open_token_file, packed_token_dataset, write_token_file
from tests.data.byte_tokenizer import ByteTokenizer

L = 16


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    docs = [f"doc {i}: " + "abcdefghij"[: i % 10 + 1] * (i % 5 + 1) for i in range(300)]
    with open(tmp / "c.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    write_token_file(tmp / "c.bin", ByteTokenizer(), tmp / "c.jsonl", num_workers=0, progress=False)
    return tmp / "c.bin"


def test_windows_are_shifted_and_every_token_is_a_target_exactly_once(token_file):
    tokens, meta = open_token_file(token_file)
    ds = PackedTokenDataset(token_file, max_seq_len=L)
    assert PackedTokenDataset.shifted_labels is True
    assert len(ds) == (meta["num_tokens"] - 1) // L and ds.num_tokens == len(ds) * L
    for i in (0, 1, len(ds) - 1):
        np.testing.assert_array_equal(ds.window(i), tokens[i * L : i * L + L + 1])
        item = ds[i]
        assert item["labels"][:-1] == item["tokens"][1:] and len(item["tokens"]) == len(item["labels"]) == L
    all_labels = np.concatenate([ds[i]["labels"] for i in range(len(ds))])
    np.testing.assert_array_equal(all_labels, tokens[1 : len(ds) * L + 1])
    assert ds[-1] == ds[len(ds) - 1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_batches_collate_with_torchtunes_padded_collate_sft(token_file):
    ds = PackedTokenDataset(token_file, max_seq_len=L)
    batch = padded_collate_sft([ds[0], ds[1]], padding_idx=0, ignore_idx=-100)
    assert batch["tokens"].shape == batch["labels"].shape == (2, L) and batch["tokens"].dtype == torch.long
    assert (batch["labels"][:, :-1] == batch["tokens"][:, 1:]).all()


def _order(ds, seed, rank=0, world=1, epoch=0):
    sampler = StatefulDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_shuffled_order_is_deterministic_per_seed_and_epoch(token_file):
    ds = PackedTokenDataset(token_file, max_seq_len=L)
    a = _order(ds, seed=3)
    assert a == _order(ds, seed=3) and sorted(a) == list(range(len(ds)))
    assert a != _order(ds, seed=4) and a != _order(ds, seed=3, epoch=1)


def test_two_ranks_get_disjoint_shards_covering_the_data(token_file):
    ds = PackedTokenDataset(token_file, max_seq_len=L, max_tokens=(len(PackedTokenDataset(token_file, L)) // 2) * 2 * L)
    assert len(ds) % 2 == 0
    r0, r1 = _order(ds, seed=0, rank=0, world=2), _order(ds, seed=0, rank=1, world=2)
    assert len(r0) == len(r1) == len(ds) // 2
    assert not set(r0) & set(r1) and set(r0) | set(r1) == set(range(len(ds)))


@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_a_mid_epoch_state_dict_continues_exactly(token_file, world):
    ds = packed_token_dataset(ByteTokenizer(), path=token_file, max_seq_len=L)

    def loader(rank):
        sampler = StatefulDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=7)
        collate = lambda b: padded_collate_sft(b, padding_idx=0, ignore_idx=-100)  # noqa: E731
        return StatefulDataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate, drop_last=True), sampler

    for rank in range(world):
        full_dl, full_sampler = loader(rank)
        full = [b["tokens"] for b in full_dl]
        dl, sampler = loader(rank)
        it = iter(dl)
        seen = [next(it)["tokens"] for _ in range(5)]
        state = dl.state_dict()  # what the recipe checkpoint stores
        del it, dl
        dl2, _ = loader(rank)
        dl2.load_state_dict(state)
        rest = [b["tokens"] for b in dl2]
        assert len(seen) + len(rest) == len(full)
        for got, want in zip(seen + rest, full, strict=True):
            assert torch.equal(got, want)
        # The epoch after the resumed one is the normal next epoch.
        full_sampler.set_epoch(1)
        dl2.sampler.set_epoch(1)
        assert list(dl2.sampler) == list(full_sampler)


def test_max_tokens_and_several_files(token_file):
    tokens, meta = open_token_file(token_file)
    one = PackedTokenDataset(token_file, max_seq_len=L)
    two = PackedTokenDataset([token_file, token_file], max_seq_len=L)
    assert len(two) == 2 * len(one) and two[len(one)] == one[0] and two[-1] == one[-1]
    capped = PackedTokenDataset([token_file, token_file], max_seq_len=L, max_tokens=len(one) * L + 5 * L + 3)
    assert len(capped) == len(one) + 5


def test_pickling_does_not_copy_the_tokens(token_file):
    ds = PackedTokenDataset(token_file, max_seq_len=L)
    ds[0]  # opens the memmap
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000 and pickle.loads(blob)[3] == ds[3]


def test_builder_refuses_a_file_made_with_another_tokenizer(token_file):
    with pytest.raises(ValueError, match="splits text differently"):
        packed_token_dataset(ByteTokenizer(upper=True), path=token_file, max_seq_len=L)
    small = ByteTokenizer()
    small.vocab_size = 100  # the file holds ids up to ~125
    with pytest.raises(ValueError, match="re-tokenise"):
        packed_token_dataset(small, path=token_file, max_seq_len=L)
    assert len(packed_token_dataset(ByteTokenizer(upper=True), path=token_file, max_seq_len=L, check_tokenizer=False))
    with pytest.raises(ValueError, match="no window"):
        PackedTokenDataset(token_file, max_seq_len=10**9)


def test_yaml_component_builds_through_torchtune_config_instantiate(token_file):
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create({"_component_": "tad_torchtune.data.packed_token_dataset", "path": str(token_file),
                            "max_seq_len": L})  # fmt: skip
    ds = config.instantiate(cfg, ByteTokenizer())
    assert isinstance(ds, PackedTokenDataset) and len(ds[0]["tokens"]) == L


def test_start_up_is_constant_time_on_a_paper_scale_file(tmp_path, token_file):
    """2^31 tokens (4 GiB, a sparse file: nothing is written) open and serve their last window at once."""
    import time

    meta = json.loads(token_file.with_suffix(".json").read_text())
    n = 2**31
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(n * 2)
    big.with_suffix(".json").write_text(json.dumps({**meta, "num_tokens": n, "dtype": "uint16"}))
    start = time.perf_counter()
    ds = packed_token_dataset(ByteTokenizer(), path=big, max_seq_len=2048)
    item = ds[len(ds) - 1]
    elapsed = time.perf_counter() - start
    assert len(ds) == (n - 1) // 2048 and item["tokens"] == [0] * 2048
    assert elapsed < 2.0, f"start-up took {elapsed:.2f} s"
