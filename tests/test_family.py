"""Guide families: the guide table is made from the member classes, a plugin's member included."""

from __future__ import annotations

from pyrossl.guides.family import GuideFamily
from pyrossl.guides.label import LABEL_GUIDES, EnumeratedLabelGuide, GumbelSoftmaxGuide
from pyrossl.guides.zguide import Z_GUIDES


def test_the_table_reads_each_column_off_the_class():
    family = GuideFamily("toys", requires={"speed": "how fast"}, columns={"speed": lambda cls: f"{cls.speed} m/s"})

    @family.register("slow")
    class Slow:
        description = "a slow one"
        speed = 1

    assert family.header() == ["name", "what it is", "speed"]
    assert family.rows() == [["slow", "a slow one", "1 m/s"]]
    Slow.speed = 3  # the table is read when asked for, not copied at registration
    lines = family.table().splitlines()
    assert lines[0].split() == ["name", "what", "it", "is", "speed"] and set(lines[1]) == {"-", " "}
    assert lines[2].split()[-2:] == ["3", "m/s"]


def test_the_label_guides_table_says_the_site_the_elbo_and_the_loss_of_each():
    rows = {row[0]: row for row in LABEL_GUIDES.rows()}
    assert LABEL_GUIDES.header()[2:] == ["site drawn", "Pyro ELBO", "unlabelled loss"]
    assert rows["enum"][2:] == ["y, class index", "TraceEnum_ELBO", "a bound on -log p(x)"]
    assert rows["gumbel"][2:] == ["y, relaxed vector", "TraceMeanField_ELBO", "a surrogate"]
    assert rows["sample"][3] == "Trace_ELBO"
    assert rows["dirichlet"][2:] == [
        "alpha (the model's own latent)",
        "TraceMeanField_ELBO (or iwae)",
        "a bound of its own model",
    ]

    class Mine(GumbelSoftmaxGuide):
        description = "a guide of a plugin"

    LABEL_GUIDES.register("mine-for-the-table", Mine)
    try:
        assert LABEL_GUIDES.rows()[-1] == [
            "mine-for-the-table",
            "a guide of a plugin",
            "y, relaxed vector",
            "TraceMeanField_ELBO",
            "a surrogate",
        ]
        assert "mine-for-the-table" in LABEL_GUIDES.table()
    finally:
        LABEL_GUIDES.unregister("mine-for-the-table")
    assert issubclass(EnumeratedLabelGuide, LABEL_GUIDES.cls("enum"))


def test_the_z_guides_table_says_the_kl_and_the_options_of_each():
    rows = {row[0]: row[2:] for row in Z_GUIDES.rows()}
    assert rows == {
        "diag-normal": ["closed form", "-"],
        "lowrank-normal": ["Monte Carlo", "z_rank"],
        "flow": ["Monte Carlo", "flows, flow_hidden"],
    }
