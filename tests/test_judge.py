import pytest
import torch

from pyrossl.data import load_dataset
from pyrossl.data.shapes import load_shapes
from pyrossl.errors import ConfigError
from pyrossl.judge import ConvJudge, LogisticJudge, fit_judge, judge_accuracy


def test_logistic_judge_reads_digit_classes():
    d = load_dataset("digits")
    judge = fit_judge(d.x[:1400], d.y[:1400], "logistic", max_iter=500)
    assert isinstance(judge, LogisticJudge)
    pred = judge.predict(d.x[1400:])
    assert pred.dtype == torch.int64 and pred.shape == (397,)
    assert judge_accuracy(judge, d.x[1400:], d.y[1400:]) > 0.85


def test_logistic_judge_gives_one_column_per_attribute():
    d = load_shapes(num_examples=1200, attributes=["right", "bottom"])
    judge = fit_judge(d.x[:1000], d.y[:1000], "logistic")
    assert judge.predict(d.x[1000:]).shape == (200, 2)
    assert judge_accuracy(judge, d.x[1000:], d.y[1000:]) > 0.95


def test_conv_judge_reads_shape_anywhere_in_the_image_and_is_seeded():
    """The shape of an object anywhere in the image is beyond a linear judge, not beyond a small CNN."""
    d = load_shapes(num_examples=3000)
    train, test = slice(0, 2400), slice(2400, 3000)
    judge = fit_judge(d.x[train], d.y[train], "conv", seed=0, epochs=4)
    assert isinstance(judge, ConvJudge)
    per_attribute = (judge.predict(d.x[test]) == d.y[test].long()).float().mean(0)
    assert per_attribute.min() > 0.9, per_attribute
    linear = fit_judge(d.x[train], d.y[train], "logistic")
    assert judge_accuracy(linear, d.x[test], d.y[test][:, :1].expand(-1, 5)) < 0.8  # "round" is not linear
    once, again = (fit_judge(d.x[:200], d.y[:200], "conv", seed=0, epochs=1) for _ in range(2))
    assert torch.equal(once.predict(d.x[test]), again.predict(d.x[test]))


def test_conv_judge_for_a_class_label():
    d = load_dataset("digits")
    judge = fit_judge(d.x[:1400], d.y[:1400], "conv", epochs=15)
    assert judge.predict(d.x[1400:]).shape == (397,) and judge_accuracy(judge, d.x[1400:], d.y[1400:]) > 0.8


def test_unknown_judge_kind():
    with pytest.raises(ConfigError, match="unknown judge 'svm'; known: logistic, conv"):
        fit_judge(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), "svm")
