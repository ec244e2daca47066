"""Splits (balance, disjointness, determinism, official test parts), batches and binarisation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrossl.data import Dataset, batch_indices, binarize, make_split
from pyrossl.data.splits import _largest_remainder
from pyrossl.errors import ConfigError, DataError


def toy(counts: list[int], test: int = 0, multilabel: bool = False) -> Dataset:
    """A dataset with ``counts[k]`` examples of class k (in a shuffled order) and ``test`` official test examples."""
    generator = torch.Generator().manual_seed(123)
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    y = torch.cat([y[torch.randperm(len(y), generator=generator)], torch.arange(test) % len(counts)])
    if multilabel:
        y = torch.stack([y % 2, y // 2 % 2], dim=1).float()
    return Dataset(
        name="toy",
        x=torch.rand(len(y), 1, 2, 2, generator=generator),
        y=y,
        classes=tuple(f"c{k}" for k in range(len(counts))) if not multilabel else (),
        attributes=("a0", "a1") if multilabel else (),
        test_index=torch.arange(len(y) - test, len(y)) if test else None,
    )


def parts(split):
    return [split.labelled, split.unlabelled, split.validation, split.test]


def assert_valid(split, n: int, complete: bool = True) -> None:
    """Every part sorted int64, parts disjoint, and (when ``complete``) together all of 0..n-1."""
    for index in parts(split):
        assert index.dtype == torch.int64
        assert torch.equal(index, torch.sort(index).values)
    union = torch.cat(parts(split))
    assert len(torch.unique(union)) == len(union)
    if complete:
        assert torch.equal(torch.sort(union).values, torch.arange(n))


def class_counts(ds, index):
    return torch.bincount(ds.y[index], minlength=len(ds.classes)).tolist()


def test_labelled_set_is_balanced_and_hold_outs_stratified():
    ds = toy([100, 200, 300])
    split = make_split(ds, labels_per_class=10, validation=0.1, test=0.2, seed=0)
    assert_valid(split, len(ds))
    assert class_counts(ds, split.labelled) == [10, 10, 10]
    assert class_counts(ds, split.test) == [20, 40, 60]
    assert class_counts(ds, split.validation) == [10, 20, 30]
    assert split.sizes() == {"labelled": 30, "unlabelled": 390, "validation": 60, "test": 120}


def test_full_supervision_and_no_labels():
    ds = toy([30, 30])
    full = make_split(ds, validation=6, test=0)
    assert full.unlabelled.numel() == 0 and full.test.numel() == 0 and full.labelled.numel() == 54
    none = make_split(ds, labels_per_class=0, validation=0, test=0)
    assert none.labelled.numel() == 0 and none.unlabelled.numel() == 60
    assert_valid(full, 60)
    assert_valid(none, 60)


def test_deterministic_for_a_seed_and_different_across_seeds():
    ds = toy([50, 50, 50])
    state = torch.get_rng_state()
    first, again = make_split(ds, labels_per_class=5, seed=7), make_split(ds, labels_per_class=5, seed=7)
    other = make_split(ds, labels_per_class=5, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(parts(first), parts(again)))
    assert not torch.equal(first.labelled, other.labelled)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not used


def test_official_test_part_is_the_test_set():
    ds = toy([40, 40], test=20)
    split = make_split(ds, labels_per_class=3, validation=0.25, test=0.5)
    assert torch.equal(split.test, torch.arange(80, 100))
    assert split.validation.numel() == 20  # a fraction of the 80 non-test examples
    assert_valid(split, len(ds))


def test_limit_per_class():
    ds = toy([500] * 10)
    split = make_split(ds, labels_per_class=10, validation=0, test=0.2, limit_per_class=300)
    union = torch.cat(parts(split))
    assert class_counts(ds, union) == [300] * 10
    assert split.test.numel() == 600 and class_counts(ds, split.test) == [60] * 10
    assert_valid(split, len(ds), complete=False)


def test_limit_per_class_keeps_smaller_classes_whole():
    ds = toy([5, 50])
    split = make_split(ds, validation=0, test=0, limit_per_class=20)
    assert class_counts(ds, split.labelled) == [5, 20]


def test_label_fraction_is_stratified():
    ds = toy([100, 300])
    split = make_split(ds, label_fraction=0.25, validation=0, test=0)
    assert class_counts(ds, split.labelled) == [25, 75]
    assert split.unlabelled.numel() == 300
    assert make_split(ds, label_fraction=1.0, validation=0, test=0).unlabelled.numel() == 0


def test_multilabel_takes_a_fraction_not_labels_per_class():
    ds = toy([20, 20, 20, 20], multilabel=True)
    split = make_split(ds, label_fraction=0.5, validation=0.1, test=0.1)
    assert split.sizes() == {"labelled": 32, "unlabelled": 32, "validation": 8, "test": 8}
    assert_valid(split, len(ds))
    with pytest.raises(ConfigError, match="label_fraction for a multi-label"):
        make_split(ds, labels_per_class=2)


def test_too_many_labels_names_the_class():
    ds = toy([100, 12, 100])
    with pytest.raises(ConfigError, match="labels_per_class=10 but class 'c1' has only 9 examples left"):
        make_split(ds, labels_per_class=10, validation=0.1, test=0.2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"labels_per_class": -1}, "labels_per_class must be an integer >= 0"),
        ({"labels_per_class": 1.5}, "labels_per_class must be an integer"),
        ({"validation": -2}, "validation must be an integer >= 0"),
        ({"validation": 1.0}, r"validation must be a count \(int >= 0\) or a fraction in \[0, 1\)"),
        ({"test": -0.1}, "test must be"),
        ({"label_fraction": 1.5}, r"label_fraction must be a fraction in \[0, 1\]"),
        ({"labels_per_class": 2, "label_fraction": 0.5}, "not both"),
        ({"limit_per_class": 0}, "limit_per_class must be an integer >= 1"),
        ({"validation": 0.5, "test": 0.5}, r"validation \(30\) and test \(30\) hold out all 60 examples"),
        ({"validation": 61}, "validation=61 is more than the 60 examples"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        make_split(toy([30, 30]), **options)


def test_negative_labels_are_a_data_error():
    ds = toy([5, 5])
    ds.y[0] = -1
    with pytest.raises(DataError, match="labels must be class indices >= 0"):
        make_split(ds)


def test_largest_remainder_sums_exactly():
    assert _largest_remainder([1, 1, 1], 2) == [1, 1, 0]
    assert _largest_remainder([10, 20, 30], 7) == [1, 2, 4]
    assert _largest_remainder([3, 0, 5], 8) == [3, 0, 5]
    assert _largest_remainder([], 0) == []


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    labels_per_class=st.integers(0, 5),
    validation=st.one_of(st.integers(0, 5), st.floats(0, 0.4)),
    test=st.one_of(st.integers(0, 5), st.floats(0, 0.4)),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_properties(counts, labels_per_class, validation, test, seed):
    ds = toy(counts)
    try:
        split = make_split(ds, labels_per_class=labels_per_class, validation=validation, test=test, seed=seed)
    except ConfigError as error:
        assert "labels_per_class" in str(error) or "hold out all" in str(error) or "more than" in str(error)
        return
    assert_valid(split, len(ds))
    assert class_counts(ds, split.labelled) == [labels_per_class] * len(counts)
    # Stratified hold-outs: each class within one example of its proportional share.
    for held in (split.test, split.validation):
        share = torch.tensor(counts, dtype=torch.float64) * held.numel() / sum(counts)
        assert (torch.tensor(class_counts(ds, held)) - share).abs().max() < 1 + 1e-9
    again = make_split(ds, labels_per_class=labels_per_class, validation=validation, test=test, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(parts(split), parts(again)))


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_label_fraction_properties(counts, fraction, seed):
    ds = toy(counts)
    split = make_split(ds, label_fraction=fraction, validation=0, test=0, seed=seed)
    assert_valid(split, len(ds))
    assert abs(split.labelled.numel() - fraction * len(ds)) <= 0.5
    share = torch.tensor(counts, dtype=torch.float64) * split.labelled.numel() / sum(counts)
    assert (torch.tensor(class_counts(ds, split.labelled)) - share).abs().max() < 1 + 1e-9


def test_batch_indices_cover_every_index_once():
    index = torch.arange(10, 33)
    batches = batch_indices(index, 5, generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.sort(torch.cat(batches)).values, index)
    assert not torch.equal(torch.cat(batches), index)  # shuffled
    assert [len(b) for b in batch_indices(index, 5, drop_last=True, shuffle=False)] == [5, 5, 5, 5]
    assert torch.equal(torch.cat(batch_indices(index, 7, shuffle=False)), index)
    assert batch_indices(torch.arange(0), 4) == []


def test_batch_indices_are_reproducible():
    one = batch_indices(torch.arange(50), 8, generator=torch.Generator().manual_seed(3))
    two = batch_indices(torch.arange(50), 8, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_batch_size_must_be_positive(batch_size):
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        batch_indices(torch.arange(4), batch_size)


def test_binarize():
    x = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sample = binarize(x, generator=torch.Generator().manual_seed(1))
    assert sample.shape == x.shape and sample.dtype == x.dtype
    assert set(sample.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(sample, binarize(x, generator=torch.Generator().manual_seed(1)))
    assert abs(float(sample.mean()) - float(x.mean())) < 0.05


def test_figure_sample_is_stratified_interleaved_and_seeded():
    from pyrossl.data.splits import figure_sample

    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rows = figure_sample(y, 10, seed=0)
    assert len(set(rows.tolist())) == 10 and torch.bincount(y[rows], minlength=3).tolist() == [5, 3, 2]
    assert y[rows[:3]].tolist() == [0, 1, 2]  # every class before any class's second
    assert torch.equal(rows, figure_sample(y, 10, seed=0)) and not torch.equal(rows, figure_sample(y, 10, seed=1))
    assert sorted(figure_sample(y, 500).tolist()) == list(range(100))  # n beyond the part: all of it
    rare = torch.tensor([0] * 98 + [1, 2])
    assert sorted(rare[figure_sample(rare, 3)].tolist()) == [0, 1, 2]  # rare classes kept
    attributes = torch.randint(0, 2, (40, 5))
    assert len(set(figure_sample(attributes, 7).tolist())) == 7  # multi-label: a seeded random sample
