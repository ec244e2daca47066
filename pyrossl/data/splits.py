"""Seeded, class-balanced splits of a dataset, batches of indices, and dynamic binarisation.

A split is four disjoint, sorted ``int64`` index tensors (:class:`Split`): labelled, unlabelled,
validation and test. Every random choice draws from a local ``torch.Generator`` seeded by the caller,
so a split depends on its arguments only, never on the global random state.
"""

from __future__ import annotations

import math
import numbers

import torch

from pyrossl.data.dataset import Dataset, Split
from pyrossl.errors import ConfigError, DataError


def make_split(
    ds: Dataset,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    validation: int | float = 0.1,
    test: int | float = 0.2,
    seed: int = 0,
    limit_per_class: int | None = None,
) -> Split:
    """Return a seeded split of ``ds`` into labelled, unlabelled, validation and test indices.

    The steps, each drawing without replacement from what the previous ones left:

    1. The pool is every example outside ``ds.test_index``.
    2. ``limit_per_class`` keeps at most that many random examples of each class in the pool.
    3. Test: ``ds.test_index`` when the dataset has an official test part (``test`` is then
       ignored), else a stratified hold-out of ``test`` examples from the pool.
    4. Validation: a stratified hold-out of ``validation`` examples from the pool.
    5. Labelled: ``labels_per_class`` examples of each class; or a stratified ``label_fraction`` of
       what is left; or, when both are None, everything left (full supervision).
    6. Unlabelled: everything left.

    ``validation`` and ``test`` are counts (int) or fractions of the pool (float in [0, 1)).
    "Stratified" spreads a count over the classes in proportion to their sizes, rounding by the
    largest-remainder method so the parts add up to the count exactly. A multi-label dataset (``y``
    of shape ``[N, A]``) has no classes to stratify by: its hold-outs and labelled part are plain
    random subsets, and it takes ``label_fraction`` but not ``labels_per_class``.

    Raises:
        ConfigError: negative counts, fractions out of range, both ``labels_per_class`` and
            ``label_fraction``, hold-outs that leave nothing to train on, or a class with fewer
            than ``labels_per_class`` examples left.
        DataError: labels that are negative, or a ``test_index`` outside the dataset.
    """
    _check_count("labels_per_class", labels_per_class)
    _check_count("limit_per_class", limit_per_class, minimum=1)
    if label_fraction is not None:
        _check_fraction("label_fraction", label_fraction, closed=True)
        if labels_per_class is not None:
            raise ConfigError("give labels_per_class or label_fraction, not both")
    for name, amount in (("validation", validation), ("test", test)):
        if _is_count(amount):
            _check_count(name, amount)
        else:
            _check_fraction(name, amount)
    if ds.multilabel and labels_per_class is not None:
        raise ConfigError("labels_per_class needs single-label classes; use label_fraction for a multi-label dataset")
    if ds.multilabel and limit_per_class is not None:
        raise ConfigError("limit_per_class needs single-label classes; this dataset is multi-label")

    generator = torch.Generator().manual_seed(seed)
    official_test = _official_test(ds)
    in_pool = torch.ones(len(ds), dtype=torch.bool)
    if official_test is not None:
        in_pool[official_test] = False
    groups = _shuffled_groups(ds, torch.nonzero(in_pool).flatten(), generator)
    if limit_per_class is not None:
        groups = [group[:limit_per_class] for group in groups]
    pool_size = sum(len(group) for group in groups)

    if pool_size == 0:
        raise DataError(f"dataset {ds.name!r} has no examples outside its official test part")
    test_size = 0 if official_test is not None else _resolve("test", test, pool_size)
    validation_size = _resolve("validation", validation, pool_size)
    if test_size + validation_size >= pool_size:
        held = f"validation ({validation_size})" + (f" and test ({test_size})" if official_test is None else "")
        raise ConfigError(
            f"{held} hold out all {pool_size} examples of the pool, leaving nothing to train on; lower them"
        )

    if official_test is None:
        test_index, groups = _take(groups, _largest_remainder([len(g) for g in groups], test_size))
    else:
        test_index = official_test
    validation_index, groups = _take(groups, _largest_remainder([len(g) for g in groups], validation_size))

    sizes = [len(group) for group in groups]
    if labels_per_class is not None:
        for label, size in enumerate(sizes):
            if size < labels_per_class:
                raise ConfigError(
                    f"labels_per_class={labels_per_class} but class {_class_name(ds, label)!r} has only {size} "
                    "examples left after the test and validation hold-outs"
                )
        labelled_counts = [labels_per_class] * len(sizes)
    elif label_fraction is not None:
        labelled_counts = _largest_remainder(sizes, math.floor(label_fraction * sum(sizes) + 0.5))
    else:
        labelled_counts = sizes
    labelled_index, groups = _take(groups, labelled_counts)
    unlabelled_index = torch.cat(groups)

    return Split(
        labelled=_sorted(labelled_index),
        unlabelled=_sorted(unlabelled_index),
        validation=_sorted(validation_index),
        test=_sorted(test_index),
    )


def batch_indices(
    index: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """Return ``index`` cut into consecutive batches of ``batch_size`` (the last one may be smaller).

    With ``shuffle`` the order is first permuted using ``generator`` (the global generator when
    None). ``drop_last`` drops a final batch smaller than ``batch_size``. An empty index gives [].
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    index = index.flatten()
    if index.numel() == 0:
        return []
    if shuffle:
        index = index[torch.randperm(index.numel(), generator=generator)]
    batches = list(torch.split(index, int(batch_size)))
    if drop_last and batches[-1].numel() < batch_size:
        batches.pop()
    return batches


def figure_sample(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Row indices of at most ``n`` examples of a part with labels ``y``, for the figures of a run.

    A seeded stratified sample: each class keeps its share of the part (largest remainder, at least
    one example of every class present when ``n`` allows), drawn at random within the class, and the
    rows are interleaved class by class, so that any prefix of the sample spreads over the classes
    (the first ten rows of ten-class data hold ten classes). Parts are stored sorted, often by class:
    their first rows would show one class. Multi-label ``y`` (a matrix): a seeded random sample.
    """
    generator = torch.Generator().manual_seed(int(seed))
    count = y.shape[0]
    n = min(int(n), count)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        return torch.randperm(count, generator=generator)[:n]
    classes, inverse = torch.unique(y.cpu(), return_inverse=True)
    members = [torch.nonzero(inverse == c).flatten() for c in range(len(classes))]
    members = [m[torch.randperm(len(m), generator=generator)] for m in members]
    sizes = [len(m) for m in members]
    take = _largest_remainder(sizes, n)
    if n >= len(classes):  # every class shown, taken from the largest shares
        for c in range(len(classes)):
            if take[c] == 0:
                take[max(range(len(classes)), key=lambda k: take[k])] -= 1
                take[c] = 1
    # interleave: the r-th example of every class before the (r + 1)-th of any
    rows = [(r, c, int(m[r])) for c, m in enumerate(members) for r in range(take[c])]
    return torch.tensor([row for _, _, row in sorted(rows)], dtype=torch.long)


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return a dynamic binarisation of ``x``: each value ``p`` in [0, 1] becomes 1 with probability ``p``.

    Resampled at every call, as in Salakhutdinov & Murray (2008), "On the quantitative analysis of
    deep belief networks"; ``generator`` makes the draw reproducible.
    """
    return torch.bernoulli(x, generator=generator)


def _shuffled_groups(ds: Dataset, pool: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Return the pool's indices grouped by class (one group for a multi-label dataset), each in random order."""
    shuffled = pool[torch.randperm(len(pool), generator=generator)]
    if ds.multilabel:
        return [shuffled]
    if ds.y.dtype.is_floating_point or ds.y.dtype == torch.bool or ds.y.dim() != 1:
        raise DataError(
            f"dataset {ds.name!r}: labels must be integers of shape [N], found {ds.y.dtype} {tuple(ds.y.shape)}"
        )
    labels = ds.y[shuffled].long()
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"dataset {ds.name!r}: labels must be class indices >= 0, found {int(labels.min())}")
    num_classes = max(len(ds.classes), int(labels.max()) + 1 if len(labels) else 0)
    # A stable sort by label keeps the random order within each class.
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes)
    return list(torch.split(shuffled[order], counts.tolist()))


def _take(groups: list[torch.Tensor], counts: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return the first ``counts[k]`` indices of each group, concatenated, and what remains of each group."""
    taken = torch.cat([group[:count] for group, count in zip(groups, counts)])
    return taken, [group[count:] for group, count in zip(groups, counts)]


def _largest_remainder(sizes: list[int], total: int) -> list[int]:
    """Return counts proportional to ``sizes`` that sum to ``total`` (at most ``sum(sizes)``).

    Each part gets the floor of its quota ``total * size / sum(sizes)``; the parts left over go to the
    largest remainders, ties to the earlier class (Hamilton's method).
    """
    whole = sum(sizes)
    if whole == 0 or total == 0:
        return [0] * len(sizes)
    counts = [total * size // whole for size in sizes]
    remainders = [total * size % whole for size in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda k: -remainders[k])
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


def _official_test(ds: Dataset) -> torch.Tensor | None:
    """Return the dataset's official test indices, unique and checked to lie in the dataset, or None."""
    if ds.test_index is None:
        return None
    index = torch.as_tensor(ds.test_index).flatten().long().unique()
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(ds)):
        raise DataError(f"dataset {ds.name!r}: test_index holds indices outside 0..{len(ds) - 1}")
    return index


def _resolve(name: str, amount: int | float, pool_size: int) -> int:
    """Return the number of examples ``amount`` means: itself if a count, else that fraction of the pool."""
    if _is_count(amount):
        if amount > pool_size:
            raise ConfigError(f"{name}={amount} is more than the {pool_size} examples available")
        return int(amount)
    return math.floor(amount * pool_size + 0.5)


def _is_count(amount: object) -> bool:
    return isinstance(amount, numbers.Integral) and not isinstance(amount, bool)


def _check_count(name: str, value: object, minimum: int = 0) -> None:
    """Raise ConfigError unless ``value`` is None or an integer >= ``minimum``."""
    if value is not None and (not _is_count(value) or value < minimum):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: object, closed: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a number in [0, 1), or [0, 1] when ``closed``."""
    in_range = isinstance(value, numbers.Real) and (0 <= value <= 1 if closed else 0 <= value < 1)
    if isinstance(value, bool) or not in_range:
        expected = "a fraction in [0, 1]" if closed else "a count (int >= 0) or a fraction in [0, 1)"
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _class_name(ds: Dataset, label: int) -> str:
    return ds.classes[label] if label < len(ds.classes) else str(label)


def _sorted(index: torch.Tensor) -> torch.Tensor:
    return torch.sort(index.long()).values
