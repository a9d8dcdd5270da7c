"""Recipe schema, overrides and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_efftrain import Recipe, RecipeError, load_recipe
from hf_efftrain.core.build import make_techniques
from hf_efftrain.core.recipe import apply_override

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    make_techniques(recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# hf-efftrain train recipes/") or first.startswith("# accelerate launch"), first


def test_techniques_get_their_own_config(tiny_recipe):
    recipe = Recipe.parse(tiny_recipe(techniques=[{"name": "lion", "lr": 1e-4, "weight_decay": 0.1}]))
    (lion,) = recipe.techniques
    assert type(lion).__name__ == "LionConfig" and lion.lr == 1e-4 and lion.beta2 == 0.99
    assert recipe.to_dict()["techniques"][0]["weight_decay"] == 0.1


@pytest.mark.parametrize(
    "technique",
    [
        {"name": "mixed_precision", "dtype": "bf16"},
        {"name": "bf16"},
        {"name": "lion", "bits": 8},
        {"name": "peft"},
        {"name": "attention", "implementation": "eager"},
    ],
)
def test_saved_recipe_reads_back_and_validates(tiny_recipe, technique):
    """run.py writes recipe.to_dict() as the run's recipe.yaml: it must run again as it is (fields a technique
    rejects outside their mode, such as mixed_precision's fp16-only init_scale, are not written out as defaults)."""
    recipe = Recipe.parse(tiny_recipe(techniques=[technique]))
    again = Recipe.parse(recipe.to_dict())
    assert again == recipe and again.to_dict() == recipe.to_dict()
    assert [t.name for t in make_techniques(again)] == [technique["name"]]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["model"].update(colour="red"), "model.colour: unknown field; allowed: name_or_path"),
        (lambda r: r.update(extra_section=1), "extra_section: unknown field; allowed: model, data, training"),
        (lambda r: r["training"].update(max_steps="ten"), "training.max_steps: Input should be a valid integer"),
        (
            lambda r: r["training"].update(max_stepz=3),
            "training.max_stepz: not a transformers.TrainingArguments field; did you mean max_steps",
        ),
        (lambda r: r["training"].update(deepspeed="ds.json"), "training.deepspeed: distributed settings live in"),
        (lambda r: r["data"].update(max_length=0), "data.max_length: must be >= 8 (got 0)"),
        (lambda r: r["model"].update(task="vision"), "model.task: must be one of"),
        (
            lambda r: r.update(techniques=[{"name": "bf16"}, {"name": "lion", "weight_decay": -1}]),
            "techniques[1].weight_decay: must be >= 0",
        ),
        (
            lambda r: r.update(techniques=[{"name": "lion", "betas": [0.9, 0.99]}]),
            "techniques[0].betas: unknown field; allowed: name, lr, beta1, beta2",
        ),
        (lambda r: r.update(techniques=[{"name": "nope"}]), "techniques[0].name: unknown technique 'nope'; allowed:"),
        (lambda r: r.update(techniques=[{"name": "lion"}, {"name": "lion"}]), "techniques[1].name: technique 'lion'"),
        (lambda r: r.update(techniques=[{"lr": 1}]), "techniques[0]: each technique is a mapping with a 'name'"),
        (lambda r: r.pop("data"), "data: required field is missing"),
        # one knob per setting: the refused twin names the field and what to write instead
        (
            lambda r: r["training"].update(bf16=True),
            "training.bf16: precision is the mixed_precision technique: remove this and add "
            "{name: mixed_precision, dtype: bf16} to techniques",
        ),
        (
            lambda r: r["training"].update(optim="lion_8bit"),
            "training.optim: 'lion_8bit' is Lion, which is the lion technique: remove this and add "
            "{name: lion, bits: 8} to techniques",
        ),
        (
            lambda r: r.update(techniques=[{"name": "optimizer", "type": "paged_lion_8bit"}]),
            "techniques[0].type: paged_lion_8bit is Lion, which is the lion technique: write "
            "{name: lion, bits: 8, paged: true} instead",
        ),
        (
            lambda r: r["model"].update(attn_implementation="flash2"),
            "model.attn_implementation: unknown attention implementation 'flash2'; allowed: eager,",
        ),
        (
            lambda r: (
                r.update(techniques=[{"name": "attention", "implementation": "eager"}])
                or r["model"].update(attn_implementation="sdpa")
            ),
            "techniques[0].implementation: 'eager' but model.attn_implementation is 'sdpa'; attention is an alias",
        ),
    ],
)
def test_bad_recipes_name_the_field(tiny_recipe, mutate, expected):
    data = tiny_recipe()
    mutate(data)
    with pytest.raises(RecipeError) as info:
        Recipe.parse(data)
    assert expected in str(info.value)


def test_all_errors_reported_at_once(tiny_recipe):
    data = tiny_recipe(techniques=[{"name": "lion", "lr": -1}])
    data["training"]["max_steps"] = "x"
    with pytest.raises(RecipeError) as info:
        Recipe.parse(data)
    assert "training.max_steps" in str(info.value) and "techniques[0].lr" in str(info.value)


def test_conflicting_techniques(tiny_recipe):
    recipe = Recipe.parse(tiny_recipe(techniques=[{"name": "lion"}, {"name": "optimizer", "type": "adamw"}]))
    with pytest.raises(RecipeError, match=r"techniques\[\d\]: .* cannot be combined with"):
        make_techniques(recipe)


def test_overrides_are_typed_like_their_field(tmp_path, tiny_recipe):
    path = write(tmp_path, tiny_recipe(techniques=[{"name": "lion"}]))
    recipe = load_recipe(
        path,
        [
            "training.max_steps=11",
            "training.learning_rate=2e-4",
            "model.name_or_path=123",
            "techniques.lion.weight_decay=0.3",
            "techniques[0].beta1=0.8",
            "techniques.bf16.name=bf16",
            "model.config_overrides.num_hidden_layers=3",
            "training.disable_tqdm=false",
            "training.save_strategy=no",  # a str Enum field: YAML would read a bare no as False
        ],
        output_dir=str(tmp_path / "elsewhere"),
    )
    assert recipe.training["max_steps"] == 11 and recipe.training["learning_rate"] == 2e-4
    assert recipe.training["disable_tqdm"] is False
    assert recipe.training["save_strategy"] == "no"
    assert recipe.model.name_or_path == "123"
    assert recipe.model.config_overrides == {"num_hidden_layers": 3}
    assert recipe.techniques[0].weight_decay == 0.3 and recipe.techniques[0].beta1 == 0.8
    assert recipe.technique_names() == ["lion", "bf16"]
    assert recipe.output_dir == str(tmp_path / "elsewhere")


def test_bare_yaml_no_for_a_string_field_says_to_quote_it(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()).replace("seed: 0", "seed: 0\n  save_strategy: no"))
    with pytest.raises(RecipeError, match=r"training.save_strategy: .*\(got False\); YAML reads a bare yes/no"):
        load_recipe(path)


def test_override_errors():
    with pytest.raises(RecipeError, match="expected key.path=value"):
        apply_override({}, "training.max_steps")
    with pytest.raises(RecipeError, match="index out of range"):
        apply_override({"techniques": []}, "techniques[2].lr=1")


def test_default_output_dir_is_named_after_the_recipe(tmp_path, tiny_recipe):
    data = tiny_recipe()
    del data["training"]["output_dir"]
    path = tmp_path / "my_exp.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_recipe(path).output_dir == str(Path("runs") / "my_exp")


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(bad)
