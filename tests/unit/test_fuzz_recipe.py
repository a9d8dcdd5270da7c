"""Property tests for the recipe loader on hostile input (hypothesis).

Whatever structure a YAML file or a ``--set`` flag holds, loading it gives either a valid ``Recipe`` or a
``RecipeError`` whose every line names a field path; any other exception is a bug. Valid recipes then go through
``make_techniques`` (each technique's ``validate``) under the same property. No model is built, nothing trains.
The seed profile (derandomized, fixed example count) is registered in tests/conftest.py.
"""

from __future__ import annotations

import math
import re
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_efftrain import Recipe, RecipeError, load_recipe
from hf_efftrain.core.build import make_techniques
from hf_efftrain.core.recipe import _training_fields, apply_override
from hf_efftrain.core.registry import all_techniques
from hf_efftrain.core.sections import TASKS, DataSection, ModelSection
from hf_efftrain.core.technique import Env

TECHNIQUES = all_techniques()
# A message line starts with a field path: a section, --set, recipe, or a dotted/indexed path into one.
PATH_LINE = re.compile(r"^(--set( ('.*?'|\".*?\"|\S+))?|recipe|[A-Za-z_][\w-]*)(\.[A-Za-z_][\w-]*|\[.*?\])*: \S")
SECTIONS = ("model", "data", "training", "techniques")
TRAINING_KEYS = ("max_steps", "learning_rate", "per_device_train_batch_size", "seed", "output_dir", "bf16", "optim")
ENV = Env(cuda=False, bf16_supported=True, world_size=1, installed=frozenset({"peft", "bitsandbytes"}))

FUZZ = settings(
    max_examples=150,
    deadline=None,  # the first example imports transformers and the techniques
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---- strategies ---------------------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([0, 1, -1, 8, 2**31, 2**63, 10**30, -(10**30), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["builtin:tiny-llama", "builtin:stdlib-docs", "", " ", "~", "/", "nan", "1e999", "\x00", "é"]),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans()), inner, max_size=4),
    ),
    max_leaves=12,
)


def _field_values(names: tuple[str, ...]):
    """A mapping of some known field names (and some unknown ones) to junk."""
    return st.dictionaries(st.one_of(st.sampled_from(names), st.text(max_size=8)), junk, max_size=4)


def _plausible(annotation):
    """Values of the declared type (often valid, sometimes out of range), so techniques' validate() gets exercised."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_plausible(a) for a in args])
    if origin in (list, tuple):
        return st.lists(_plausible(args[0]) if args else scalars, max_size=3)
    simple = {
        type(None): st.none(),
        bool: st.booleans(),
        int: st.integers(-2, 64),
        float: st.floats(-0.5, 2.0),
        str: st.sampled_from(["", "x", ".*", "(", "sdpa", "eager", "runs/nowhere"]),
    }
    return simple.get(annotation, junk)


def _technique_fields(name: str):
    fields = {k: f for k, f in TECHNIQUES[name].Config.model_fields.items() if k != "name"}
    return st.fixed_dictionaries({}, optional={k: _plausible(f.annotation) for k, f in sorted(fields.items())})


@st.composite
def techniques_entries(draw, clean: bool = False):
    if clean:
        name = draw(st.sampled_from(sorted(TECHNIQUES)))
        return {"name": name, **draw(_technique_fields(name))}
    name = draw(st.one_of(st.sampled_from(sorted(TECHNIQUES)), junk))
    fields = tuple(TECHNIQUES[name].Config.model_fields) if isinstance(name, str) and name in TECHNIQUES else ("x",)
    entry = draw(_field_values(fields))
    if draw(st.booleans()):
        entry["name"] = name
    return draw(st.one_of(st.just(entry), junk)) if draw(st.integers(0, 9)) == 0 else entry


@st.composite
def recipes(draw):
    """A near-valid recipe where any level may be replaced by junk, get unknown keys or wrong-typed fields.
    Half of the examples are clean at the top (only the techniques' values vary), to reach make_techniques."""
    clean = draw(st.booleans())
    recipe = {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train": "builtin:stdlib-docs"},
        "training": {"output_dir": "runs/fuzz"},
        "techniques": draw(
            st.lists(
                techniques_entries(clean), max_size=3, unique_by=(lambda e: str(e.get("name"))) if clean else None
            )
        ),
    }
    if clean:
        recipe["model"]["task"] = draw(st.sampled_from(TASKS))
        recipe["training"].update(
            draw(st.fixed_dictionaries({}, optional={"max_steps": st.integers(-1, 50), "seed": st.integers(0, 9)}))
        )
        return recipe
    recipe["model"].update(draw(_field_values(tuple(ModelSection.model_fields))))
    recipe["data"].update(draw(_field_values(tuple(DataSection.model_fields))))
    recipe["training"].update(draw(_field_values(TRAINING_KEYS)))
    for section in SECTIONS:
        if draw(st.integers(0, 7)) == 0:
            recipe[section] = draw(junk)
        elif draw(st.integers(0, 7)) == 0:
            del recipe[section]
    recipe.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in SECTIONS), junk, max_size=2)))
    return draw(st.one_of(st.just(recipe), junk)) if draw(st.integers(0, 19)) == 0 else recipe


def _well_formed(error: RecipeError) -> None:
    text = str(error)
    assert text.strip(), "empty error message"
    for line in text.splitlines():
        assert PATH_LINE.match(line), f"error line does not name a field: {line!r}"


def _check(load) -> Recipe | None:
    """Run ``load``; a Recipe or a well-formed RecipeError pass, anything else fails the property."""
    try:
        recipe = load()
    except RecipeError as e:
        _well_formed(e)
        return None
    assert isinstance(recipe, Recipe)
    try:
        make_techniques(recipe, ENV)
    except RecipeError as e:
        _well_formed(e)
    return recipe


# ---- properties ---------------------------------------------------------------------------------------------
@FUZZ
@given(recipes())
def test_parse_gives_a_recipe_or_a_recipe_error(data):
    recipe = _check(lambda: Recipe.parse(data))
    if recipe is not None:  # what was accepted is finite and round-trips
        assert Recipe.parse(recipe.to_dict()).to_dict() == recipe.to_dict()
        for value in recipe.training.values():
            assert not (isinstance(value, float) and not math.isfinite(value))


@FUZZ
@given(recipes())
def test_yaml_file_gives_a_recipe_or_a_recipe_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return
    path.write_text(text, encoding="utf-8")
    _check(lambda: load_recipe(path))


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_recipe_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("bytes") / "r.yaml"
    path.write_bytes(raw)
    _check(lambda: load_recipe(path))


override_keys = st.lists(
    st.one_of(st.sampled_from([*SECTIONS, *TRAINING_KEYS, "name_or_path", "lion", "lr", "0", "7", ""]), st.text()),
    min_size=0,
    max_size=4,
).map(".".join)
override_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "null", "[1, 2", "{a: 1}", "{name: lion}", "!!python/object:os.system x", "1e999", "nan"]),
    junk.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)


@FUZZ
@given(recipes(), st.lists(st.tuples(override_keys, override_values).map("=".join) | st.text(), max_size=4))
def test_set_overrides_give_a_recipe_or_a_recipe_error(tmp_path_factory, data, overrides):
    path = tmp_path_factory.mktemp("set") / "r.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    except yaml.YAMLError:
        return
    _check(lambda: load_recipe(path, overrides))


@FUZZ
@given(override_keys, override_values, recipes())
def test_apply_override_on_any_structure(key, value, data):
    try:
        apply_override(data, f"{key}={value}")
    except RecipeError as e:
        _well_formed(e)


@pytest.mark.parametrize("name", ["max_steps", "per_device_train_batch_size", "learning_rate", "seed"])
@pytest.mark.parametrize("value", [10**30, -(10**30), float("nan"), float("inf"), "many", [], None])
def test_training_numbers_outside_what_torch_can_hold_are_rejected(tiny_recipe, name, value):
    adapter = _training_fields()[name]
    data = tiny_recipe(training={name: value})
    try:
        recipe = Recipe.parse(data)
    except RecipeError as e:
        assert str(e).startswith(f"training.{name}: "), str(e)
        return
    # accepted: the value is exactly what TrainingArguments takes, and finite
    assert recipe.training[name] == adapter.validate_python(value) and value not in (10**30, -(10**30))


def test_structures_too_deep_or_cyclic_for_a_recipe(tiny_recipe):
    deep: dict = {}
    node = deep
    for _ in range(5000):  # deeper than Python's recursion limit
        node["a"] = node = {}
    cyclic = tiny_recipe()
    cyclic["model"]["config_overrides"] = {"self": cyclic}
    for data, expected in [({**tiny_recipe(), "model": deep}, "nested too deeply"), (cyclic, "refers to itself")]:
        with pytest.raises(RecipeError, match=expected) as info:
            Recipe.parse(data)
        _well_formed(info.value)
