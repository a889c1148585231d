"""Recipes: the shipped ones parse, malformed ones are rejected with the line that is wrong."""

from __future__ import annotations

import pytest

from kvcompile.pipeline import RecipeError, builtin_recipes, load_recipe, parse_recipe

SHIPPED = {"fp16", "naive-int4", "kivi-int4", "kivi-int2", "nsep-int4", "mixed-nsep", "mixed-nsep-2bit"}


def test_shipped_recipes_parse() -> None:
    assert set(builtin_recipes()) >= SHIPPED
    for name in builtin_recipes():
        r = load_recipe(name)
        assert r.name == name and r.passes


def test_recipe_budgets_and_windows() -> None:
    mixed = load_recipe("mixed-nsep")
    assert [p.name for p in mixed.passes] == ["profile", "calibrate", "allocate"]
    assert mixed.passes[2].options["budget_bits"] == 4.0 and mixed.runtime["window"] == 96
    two = load_recipe("mixed-nsep-2bit")
    assert two.passes[2].options["budget_bits"] == 2.5 and two.passes[-1].name == "clip"
    kivi = load_recipe("kivi-int2")
    assert kivi.runtime["window"] == 128 and kivi.passes[0].options == {"k": "kivi-2g32", "v": "kivi-2g32"}


@pytest.mark.parametrize("text,line,what", [
    ("name: x\npasses:\n  - uniform: {k: nsep-4}\n  - frobnicate: {}\n", 4, "unknown pass"),
    ("name: x\npasses:\n  - allocate:\n      budget_bits: 4\n      bugdet: 3\n", 5, "no option 'bugdet'"),
    ("name: x\npasses:\n  - allocate: {budget_bits: four}\n", 3, "must be float"),
    ("name: x\npasses: [uniform: {k: fp16}\n", 3, "invalid YAML"),
    ("name: x\npasses:\n  - uniform: {}\nruntime:\n  window: -3\n", 5, "non-negative"),
    ("name: x\npasses:\n  - profile: {}\n", 2, "needs an 'allocate' or 'uniform'"),
    ("name: x\npases:\n  - uniform: {}\n", 2, "unknown key 'pases'"),
])
def test_malformed_recipe_names_the_line(text: str, line: int, what: str) -> None:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "my.yaml")
    msg = str(e.value)
    assert f"my.yaml, line {line}:" in msg and what in msg and "\n" not in msg


def test_recipe_file_and_unknown_name(tmp_path) -> None:
    p = tmp_path / "own.yaml"
    p.write_text("name: own\npasses:\n  - uniform: {k: nsep-4, v: int-token-2}\nruntime: {window: 16}\n")
    assert load_recipe(str(p)).runtime == {"window": 16}
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("mixed-nsepp")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
