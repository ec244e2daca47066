"""Metrics against small cases worked out by hand, and their invariances."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from pyrossl import evaluate as ev

# A 6-example classification case:
#   target 0 0 1 1 2 2
#   pred   0 1 1 1 2 0      correct at 0, 2, 3, 4 -> accuracy 4/6
TARGET = [0, 0, 1, 1, 2, 2]
PRED = [0, 1, 1, 1, 2, 0]

# A 6-example clustering case against the same target. Contingency (rows cluster, columns class):
#   cluster 0: [0, 2, 1]   cluster 1: [2, 0, 0]   cluster 2: [0, 0, 1]
# Best matching 0->1, 1->0, 2->2 with 2 + 2 + 1 = 5 agreements.
CLUSTERS = [1, 1, 0, 0, 0, 2]


def naive_greedy_swap_accuracy(clusters, target):
    """Reference for the greedy matching, written plainly: a label map, full recounts, first-improvement swaps."""
    labels = sorted(set(clusters) | set(target))
    label_of = {c: c for c in labels}  # cluster -> the label it carries now

    def score(mapping):
        return sum(mapping[c] == t for c, t in zip(clusters, target))

    best = score(label_of)
    improved = True
    while improved:
        improved = False
        for first in labels:
            for second in labels:
                holder = {label: c for c, label in label_of.items()}
                trial = dict(label_of)
                trial[holder[first]], trial[holder[second]] = second, first
                if score(trial) > best:
                    label_of, best, improved = trial, score(trial), True
    return best / len(clusters)


def brute_force_cluster_accuracy(clusters, target):
    """Best accuracy over every injective map from clusters to classes (tiny cases only)."""
    cluster_values = sorted(set(clusters))
    classes = range(max(target) + 1)
    best = 0
    for assignment in itertools.permutations(list(classes) + [-1] * len(cluster_values), len(cluster_values)):
        mapping = dict(zip(cluster_values, assignment))
        best = max(best, sum(mapping[c] == t for c, t in zip(clusters, target)))
    return best / len(target)


@pytest.mark.parametrize("convert", [list, np.array, torch.tensor])
def test_classification_hand_case(convert):
    pred, target = convert(PRED), convert(TARGET)
    assert ev.accuracy(pred, target) == pytest.approx(4 / 6)
    cm = ev.confusion_matrix(pred, target, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert ev.per_class_accuracy(pred, target, 3) == pytest.approx([0.5, 1.0, 0.5])


def test_per_class_accuracy_absent_class_is_nan():
    acc = ev.per_class_accuracy([0, 1, 1], [0, 1, 0], num_classes=3)
    assert acc[:2] == pytest.approx([0.5, 1.0])
    assert math.isnan(acc[2])


def test_classification_metrics_keys_and_json():
    metrics = ev.classification_metrics(torch.tensor(PRED), torch.tensor(TARGET), 3, prefix="test_")
    assert set(metrics) == {"test_accuracy", "test_per_class_accuracy"}
    assert isinstance(metrics["test_accuracy"], float)
    assert metrics["test_per_class_accuracy"] == pytest.approx([0.5, 1.0, 0.5])
    json.dumps(metrics)


def test_cluster_hand_case():
    assert ev.cluster_mapping(CLUSTERS, TARGET) == {0: 1, 1: 0, 2: 2}
    assert ev.cluster_accuracy(CLUSTERS, TARGET) == pytest.approx(5 / 6)
    assert ev.greedy_cluster_accuracy(CLUSTERS, TARGET) == pytest.approx(5 / 6)


def test_nmi_hand_case():
    # H(Y) = log 3 (three classes of 2); H(C) = 2/3 log 2 + 1/2 log 3 (clusters of 3, 2, 1);
    # I(C; Y) = 1/3 log 2 + 1/2 log 3 from the four non-empty cells; NMI = I / ((H(C) + H(Y)) / 2).
    l2, l3 = math.log(2), math.log(3)
    mutual_information = l2 / 3 + l3 / 2
    expected = mutual_information / ((2 / 3 * l2 + l3 / 2 + l3) / 2)
    assert ev.nmi(CLUSTERS, TARGET) == pytest.approx(expected)
    assert ev.nmi(CLUSTERS, TARGET) == pytest.approx(0.73967, abs=1e-5)


def test_ari_hand_case():
    # Pairs within cells: C(2,2) + C(1,2) + C(2,2) + C(1,2) = 2; within clusters 3 + 1 + 0 = 4;
    # within classes 1 + 1 + 1 = 3; all pairs C(6,2) = 15; expected 4 * 3 / 15 = 0.8;
    # ARI = (2 - 0.8) / ((4 + 3) / 2 - 0.8) = 4 / 9.
    assert ev.ari(CLUSTERS, TARGET) == pytest.approx(4 / 9)


def test_clustering_metrics_keys():
    metrics = ev.clustering_metrics(np.array(CLUSTERS), np.array(TARGET), prefix="val_")
    assert set(metrics) == {"val_cluster_accuracy", "val_greedy_cluster_accuracy", "val_nmi", "val_ari"}
    assert metrics["val_cluster_accuracy"] == pytest.approx(5 / 6)
    assert all(isinstance(v, float) for v in metrics.values())
    json.dumps(metrics)


def test_perfect_clustering_under_any_renaming():
    target = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    for perm in itertools.permutations(range(4)):
        clusters = np.array(perm)[target]
        assert ev.cluster_accuracy(clusters, target) == 1.0
        assert ev.nmi(clusters, target) == pytest.approx(1.0)
        assert ev.ari(clusters, target) == pytest.approx(1.0)


def test_cluster_accuracy_is_permutation_invariant():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=60)
    clusters = np.where(rng.random(60) < 0.6, target, rng.integers(0, 4, size=60))
    base = ev.cluster_accuracy(clusters, target)
    for perm in itertools.permutations(range(4)):
        assert ev.cluster_accuracy(np.array(perm)[clusters], target) == base
    # Arbitrary cluster ids: negative, sparse.
    ids = np.array([-5, 3, 17, 100])
    assert ev.cluster_accuracy(ids[clusters], target) == base


def test_more_clusters_than_classes():
    # Clusters 0 -> 0 and 1 -> 1 are matched; clusters 2 and 3 get no class, so their examples
    # count as wrong even though they are all of class 1.
    clusters = [0, 0, 1, 1, 2, 3]
    target = [0, 0, 1, 1, 1, 1]
    mapping = ev.cluster_mapping(clusters, target)
    assert mapping[0] == 0 and len(mapping) == 2 and set(mapping.values()) == {0, 1}
    assert ev.cluster_accuracy(clusters, target) == pytest.approx(4 / 6)
    assert ev.cluster_accuracy(clusters, target) == brute_force_cluster_accuracy(clusters, target)


def test_fewer_clusters_than_classes():
    assert ev.cluster_mapping([0] * 6, TARGET) in ({0: 0}, {0: 1}, {0: 2})
    assert ev.cluster_accuracy([0] * 6, TARGET) == pytest.approx(2 / 6)
    clusters = [0, 0, 0, 1, 1, 1]
    assert ev.cluster_accuracy(clusters, TARGET) == pytest.approx(4 / 6)
    assert ev.greedy_cluster_accuracy(clusters, TARGET) == pytest.approx(4 / 6)


def test_cluster_mapping_num_classes_adds_empty_classes():
    mapping = ev.cluster_mapping([0, 0, 1], [0, 0, 0], num_classes=2)
    assert mapping == {0: 0, 1: 1}
    with pytest.raises(ValueError, match="target must lie in"):
        ev.cluster_mapping([0, 1], [0, 2], num_classes=2)


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n_clusters, n_classes = rng.integers(1, 5, size=2)
        target = rng.integers(0, n_classes, size=12)
        clusters = rng.integers(0, n_clusters, size=12)
        assert ev.cluster_accuracy(clusters, target) == pytest.approx(
            brute_force_cluster_accuracy(clusters.tolist(), target.tolist())
        )


def test_greedy_stops_short_of_hungarian():
    # Contingency n[cluster, class] with the identity worth 2 + 2 + 2 = 6 and the 3-cycle
    # 0->1, 1->2, 2->0 worth 3 + 3 + 3 = 9; every single swap is worth 5, so greedy swapping
    # never leaves the identity.
    table = np.array([[2, 3, 0], [0, 2, 3], [3, 0, 2]])
    clusters, target = [], []
    for c, k in itertools.product(range(3), range(3)):
        clusters += [c] * table[c, k]
        target += [k] * table[c, k]
    assert ev.greedy_cluster_accuracy(clusters, target) == pytest.approx(6 / 15)
    assert ev.cluster_accuracy(clusters, target) == pytest.approx(9 / 15)
    assert ev.cluster_mapping(clusters, target) == {0: 1, 1: 2, 2: 0}
    assert naive_greedy_swap_accuracy(clusters, target) == pytest.approx(6 / 15)


def test_greedy_matches_the_naive_reference_and_never_beats_hungarian():
    rng = np.random.default_rng(2)
    for _ in range(30):
        k = int(rng.integers(2, 6))
        target = rng.integers(0, k, size=30)
        clusters = np.concatenate([np.arange(k), rng.integers(0, k, size=30 - k)])
        greedy = ev.greedy_cluster_accuracy(clusters, target)
        assert greedy == pytest.approx(naive_greedy_swap_accuracy(clusters.tolist(), target.tolist()))
        assert greedy <= ev.cluster_accuracy(clusters, target) + 1e-12


def test_attribute_accuracy_two_attributes():
    pred = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.6, 0.5]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    # Attribute 0: predicted [1, 0, 1] vs [1, 0, 0] -> 2/3.
    # Attribute 1: predicted [0, 1, 0] (0.5 is not above the threshold) vs [0, 0, 1] -> 1/3.
    mean, per_attribute = ev.attribute_accuracy(pred, target)
    assert per_attribute == pytest.approx([2 / 3, 1 / 3])
    assert mean == pytest.approx(1 / 2)
    # 0/1 predictions and a different threshold.
    mean, per_attribute = ev.attribute_accuracy(np.array([[1, 0], [0, 1]]), np.array([[1, 1], [0, 1]]))
    assert per_attribute == pytest.approx([1.0, 0.5]) and mean == pytest.approx(0.75)
    # Threshold 0.3: predicted [1, 1, 1] -> 1/3 and [0, 1, 1] -> 2/3.
    _, per_attribute = ev.attribute_accuracy(pred, target, threshold=0.3)
    assert per_attribute == pytest.approx([1 / 3, 2 / 3])


def test_iwae_single_sample_is_the_weight():
    w = torch.tensor([[-3.0, 0.5, -120.0]])
    torch.testing.assert_close(ev.iwae_log_likelihood(w), w[0])


def test_iwae_equal_weights_give_that_weight():
    w = torch.full((7, 4), -2.5, dtype=torch.float64)
    torch.testing.assert_close(ev.iwae_log_likelihood(w), torch.full((4,), -2.5, dtype=torch.float64))


def test_iwae_stable_for_very_negative_weights():
    w = torch.tensor([[-1e4, -1e4], [-1e4, -1e4 + math.log(3.0)]], dtype=torch.float64)
    result = ev.iwae_log_likelihood(w)
    assert torch.isfinite(result).all()
    # log((e^a + e^a) / 2) = a;  log((e^a + 3 e^a) / 2) = a + log 2.
    torch.testing.assert_close(result, torch.tensor([-1e4, -1e4 + math.log(2.0)], dtype=torch.float64))


def test_iwae_at_least_mean_weight():
    w = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * 3 - 100
    assert (ev.iwae_log_likelihood(w) >= w.mean(0) - 1e-5).all()


def test_iwae_accepts_numpy_and_integers():
    result = ev.iwae_log_likelihood(np.array([[1, 1], [1, 1]]))
    assert isinstance(result, torch.Tensor)
    torch.testing.assert_close(result, torch.ones(2))


@pytest.mark.parametrize(
    "call",
    [
        lambda: ev.accuracy([0, 1, 2], [0, 1]),
        lambda: ev.confusion_matrix([0, 1], [0, 1, 1], 2),
        lambda: ev.per_class_accuracy([0], [0, 0], 2),
        lambda: ev.cluster_accuracy([0, 1, 2], [0, 1]),
        lambda: ev.greedy_cluster_accuracy([0, 1], [0]),
        lambda: ev.nmi([0, 1], [0, 1, 1]),
        lambda: ev.ari([0], [0, 1]),
        lambda: ev.attribute_accuracy(np.zeros((3, 2)), np.zeros((3, 3))),
        lambda: ev.classification_metrics([0, 1], [0], 2),
        lambda: ev.clustering_metrics([0, 1], [0]),
    ],
)
def test_length_mismatch_is_value_error(call):
    with pytest.raises(ValueError, match="same"):
        call()


def test_other_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        ev.accuracy(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="integer"):
        ev.accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        ev.accuracy([], [])
    with pytest.raises(ValueError, match=r"pred must lie in \[0, 1\]"):
        ev.confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match=r"\[N, A\]"):
        ev.attribute_accuracy(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="0 and 1"):
        ev.attribute_accuracy(np.zeros((2, 1)), np.full((2, 1), 2.0))
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        ev.iwae_log_likelihood(torch.zeros(3))
    with pytest.raises(ValueError, match="K = 0"):
        ev.iwae_log_likelihood(torch.zeros(0, 3))


def test_mean_sd_over_seeds():
    from pyrossl.evaluate import mean_sd

    assert mean_sd([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))
    assert mean_sd([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_sd([])


def test_label_tables_of_parts_add_up_and_give_the_metrics_of_the_labels():
    rng = np.random.default_rng(0)
    clusters, target = rng.integers(0, 4, 200), rng.integers(0, 3, 200)
    table = ev.label_table(clusters[:70], target[:70], 4, 3) + ev.label_table(clusters[70:], target[70:], 4, 3)
    assert torch.equal(table, ev.label_table(clusters, target, 4, 3)) and table.dtype == torch.int64
    assert int(table[2, 1]) == int(np.sum((clusters == 2) & (target == 1)))
    pairs = ev.pairs_from_table(table)
    assert ev.clustering_metrics(*pairs) == ev.clustering_metrics(clusters, target)
    pred = clusters % 3
    assert ev.classification_metrics(
        *ev.pairs_from_table(ev.label_table(pred, target, 3, 3)), 3
    ) == ev.classification_metrics(pred, target, 3)


@pytest.mark.parametrize(
    "pred, target, message",
    [
        ([0, 3], [0, 1], r"pred labels must lie in 0..2"),
        ([0, 1], [0, -1], r"target labels must lie in 0..2"),
        ([0, 1, 2], [0, 1], "same length"),
    ],
)
def test_label_table_rejects_labels_out_of_range(pred, target, message):
    with pytest.raises(ValueError, match=message):
        ev.label_table(pred, target, 3, 3)


def test_reconstruction_cross_entropy_is_summed_over_images_in_batches():
    x = torch.rand(5, 1, 2, 2)
    z = torch.randn(5, 3)
    weight = torch.randn(3, 4)

    def decode(zb):
        return torch.sigmoid(zb @ weight).reshape(-1, 1, 2, 2)

    whole = torch.nn.functional.binary_cross_entropy(decode(z), x, reduction="sum").double()
    total = ev.reconstruction_bce_sum(decode, z, x, batch_size=2)
    assert total.dtype == torch.float64 and torch.allclose(total, whole)
    assert ev.per_image({"count": torch.tensor(5), "bce": total}, "bce") == pytest.approx({"bce": float(whole) / 5})
