import pytest

from pyrossl.config import Config, apply_override, config_from_dict, dumps, load_config, parse_value
from pyrossl.errors import ConfigError


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "vae"\nseed = 3\n[data]\nname = "digits"\n[train]\nepochs = 4\n[options]\nz_dim = 5\n')
    config = load_config(recipe, ["train.epochs=7", "train.lr=1e-2", "options.hidden=[32, 16]", "guide=diag-normal"])
    assert config.seed == 3 and config.train.epochs == 7 and config.train.lr == 0.01
    assert config.options == {"z_dim": 5, "hidden": [32, 16]}
    assert config.guide == "diag-normal"  # a bare word is read as a string


def test_round_trip_through_toml(tmp_path):
    config = config_from_dict(
        {"model": "vae", "data": {"name": "digits", "validation": 0.25}, "options": {"hidden": [3, 4]}}
    )
    path = tmp_path / "config.toml"
    path.write_text(dumps(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"modle": "vae"}, "did you mean 'model'"),
        ({"train": {"epoch": 3}}, "did you mean 'train.epochs'"),
        ({"data": {"labels_per_clas": 3}}, "did you mean 'data.labels_per_class'"),
        ({"train": {"epochs": "many"}}, "'train.epochs' must be an integer"),
        ({"train": {"epochs": 2.5}}, "'train.epochs' must be an integer"),
        ({"data": {"binarize": 1}}, "must be true or false"),
        ({"train": 3}, "must be a [train] section"),
    ],
)
def test_bad_configs_name_the_problem(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(raw)


def test_toml_syntax_error_names_the_line(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('model = "vae"\n[train]\nepochs = = 3\n')
    with pytest.raises(ConfigError, match=r"bad.toml: TOML syntax error: .*line 3"):
        load_config(recipe)


def test_missing_recipe():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere.toml")


def test_override_parsing():
    raw = {}
    apply_override(raw, "train.lr=3e-4")
    apply_override(raw, "data.binarize=true")
    assert raw == {"train": {"lr": 3e-4}, "data": {"binarize": True}}
    assert parse_value("[1, 2]") == [1, 2] and parse_value("enum") == "enum"
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(raw, "train.lr")


def test_defaults():
    config = Config()
    assert config.model == "vae" and config.train.epochs >= 1


def test_a_setting_is_a_field_with_its_doc_and_a_fresh_copy_of_a_list_default():
    import dataclasses

    from pyrossl.config import option_rows, setting

    @dataclasses.dataclass
    class Base:
        widths: list[int] = setting([4, 2], "layer widths")
        rate: float = setting(0.5, "a rate")

    @dataclasses.dataclass
    class Child(Base):
        rate: float = 0.25  # a new default only

    a, b = Base(), Base()
    a.widths.append(1)
    assert b.widths == [4, 2] and Child().widths == [4, 2]
    rows = [{k: r[k] for k in ("name", "default", "doc")} for r in option_rows(Child)]
    assert rows == [
        {"name": "widths", "default": "[4, 2]", "doc": "layer widths"},
        {"name": "rate", "default": "0.25", "doc": "a rate"},
    ]
