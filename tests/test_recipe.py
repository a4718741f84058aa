"""Recipe parsing, composition, overrides and the one-clear-message contract for bad input (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, alpaca_rows, sft_recipe, write_jsonl, write_recipe

from align.cli import main
from align.errors import RecipeError
from align.recipe import apply_overrides, deep_merge, load_recipe
from align.yamlio import load_yaml_text

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_plans(path, capsys, tmp_path, mmlu_cwd):
    text = path.read_text()
    assert text.startswith("#") and "Launch:" in text, "recipes start with a purpose comment and a launch command"
    if "shared/data/" in text and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("trains on ../shared/data, which is not beside this clone")
    code = main(["plan", str(path), f"output_dir={tmp_path}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    recipe = load_recipe(path)
    for st in recipe.stages:
        assert st.name in out.out


def plan_error(tmp_path: Path, recipe: dict, capsys, *overrides: str) -> str:
    path = write_recipe(tmp_path, recipe)
    code = main(["plan", str(path), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def good(tmp_path, tiny_llama):
    return sft_recipe(tmp_path, tiny_llama)


def test_good_recipe_plans(tmp_path, good, capsys):
    assert main(["plan", str(write_recipe(tmp_path, good))]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "pending" in out and "base, sft" in out


def test_unknown_top_level_key_suggests(tmp_path, good, capsys):
    good["datsets"] = good.pop("datasets")
    err = plan_error(tmp_path, good, capsys)
    assert "datsets" in err and "did you mean `datasets`" in err


def test_unknown_stage_key_and_trl_field_all_at_once(tmp_path, good, capsys):
    good["stages"][0]["adaptor"] = {"type": "lora"}
    err = plan_error(tmp_path, good, capsys)
    assert "stages[0](sft).adaptor" in err and "did you mean `adapter`" in err
    del good["stages"][0]["adaptor"]
    good["stages"][0]["train"]["learning_rat"] = 1e-4
    good["stages"][0]["train"]["max_steps"] = "many"
    err = plan_error(tmp_path, good, capsys)
    assert "2 problem(s)" in err
    assert "stages[0](sft).train.learning_rat" in err and "did you mean `learning_rate`" in err
    assert "stages[0](sft).train.max_steps" in err and "expected int" in err


def test_wrong_type_in_schema(tmp_path, good, capsys):
    good["stages"][0]["adapter"]["r"] = "eight"
    err = plan_error(tmp_path, good, capsys)
    assert "stages[0](sft).adapter.r" in err and "eight" in err


def test_unknown_stage_type(tmp_path, good, capsys):
    good["stages"][0]["type"] = "sfft"
    err = plan_error(tmp_path, good, capsys)
    assert "unknown stage type `sfft`" in err and "did you mean `sft`" in err


def test_missing_file(tmp_path, good, capsys):
    good["datasets"]["train"]["path"] = str(tmp_path / "nope.jsonl")
    err = plan_error(tmp_path, good, capsys)
    assert "datasets.train.path" in err and "not found" in err and "nope.jsonl" in err


def test_missing_column(tmp_path, good, capsys):
    write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "answer": "y"}])
    good["datasets"]["train"] = {"path": str(tmp_path / "bad.jsonl"), "format": "alpaca"}
    err = plan_error(tmp_path, good, capsys)
    assert "datasets.train" in err and "['output']" in err


def test_undetectable_format_names_the_fix(tmp_path, good, capsys):
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answer": "y"}])
    good["datasets"]["train"] = {"path": str(tmp_path / "bad.jsonl")}
    err = plan_error(tmp_path, good, capsys)
    assert "cannot tell the data format" in err and "columns:" in err


def test_column_rename_fixes_it(tmp_path, good, capsys):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "x", "answer": "y"}])
    good["datasets"]["train"] = {
        "path": str(tmp_path / "qa.jsonl"),
        "columns": {"question": "prompt", "answer": "completion"},
    }
    assert main(["plan", str(write_recipe(tmp_path, good))]) == 0


def test_illegal_combination(tmp_path, good, capsys):
    good["stages"][0]["adapter"] = {"type": "full"}
    good["stages"][0]["merge"] = True
    err = plan_error(tmp_path, good, capsys)
    assert "stages[0](sft).merge" in err


def test_reserved_trainer_field(tmp_path, good, capsys):
    good["stages"][0]["train"]["output_dir"] = "/tmp/x"
    err = plan_error(tmp_path, good, capsys)
    assert "train.output_dir" in err and "not allowed" in err


def test_messages_need_chat_template(tmp_path, tiny_gpt2, capsys):
    recipe = sft_recipe(tmp_path, tiny_gpt2)
    write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    recipe["datasets"]["train"]["path"] = str(tmp_path / "chat.jsonl")
    err = plan_error(tmp_path, recipe, capsys)
    assert "chat template" in err and "model.chat_template" in err


def test_bad_links(tmp_path, good, capsys):
    good["stages"][1]["targets"] = ["base", "sfx"]
    good["stages"][0]["data"] = "trian"
    err = plan_error(tmp_path, good, capsys)
    assert "`sfx` is not an earlier stage" in err and "did you mean `sft`" in err
    assert "unknown dataset `trian`" in err


def test_missing_recipe_and_bad_yaml(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "none.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert main(["plan", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_yaml_is_loaded_safely(tmp_path, capsys):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["plan", str(tmp_path / "evil.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_overrides_by_name_and_index(tmp_path, good):
    data = apply_overrides(
        good,
        [
            "stages.sft.train.max_steps=3",
            "stages.1.batch_size=2",
            "seed=7",
            "stages.sft.adapter.target_modules=[q_proj, v_proj]",
        ],
    )
    assert data["stages"][0]["train"]["max_steps"] == 3
    assert data["stages"][1]["batch_size"] == 2 and data["seed"] == 7
    assert data["stages"][0]["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match="did you mean `sft`"):
        apply_overrides(good, ["stages.sfd.train.max_steps=3"])


def test_exponent_floats_are_numbers(tmp_path, good):
    """PyYAML (YAML 1.1) reads `3e-4` as a string; recipes and overrides read it as the number."""
    data = apply_overrides(good, ["stages.0.train.learning_rate=3e-4", "stages.0.train.max_steps=5"])
    assert data["stages"][0]["train"]["learning_rate"] == 3e-4
    assert data["stages"][0]["train"]["max_steps"] == 5 and isinstance(data["stages"][0]["train"]["max_steps"], int)
    loaded = load_yaml_text("lr: 1e-5\nquoted: '1e3'\nn: 5\nf: 1.5\nneg: -2E+3\n")
    assert loaded == {"lr": 1e-5, "quoted": "1e3", "n": 5, "f": 1.5, "neg": -2000.0}  # quoted stays a string
    assert isinstance(loaded["n"], int)


def test_override_on_cli_is_validated(tmp_path, good, capsys):
    err = plan_error(tmp_path, good, capsys, "stages.sft.train.warmup_stepz=3")
    assert "did you mean `warmup_steps`" in err


def test_numeric_strings_from_yaml_are_numbers(tmp_path, good):
    good["stages"][0]["train"]["learning_rate"] = "2e-5"  # PyYAML reads 2e-5 (no dot) as a string
    recipe = load_recipe(write_recipe(tmp_path, good))
    from align.stages.sft import SFTConfig
    from align.trl_compat import coerce_trainer_args

    assert coerce_trainer_args(recipe.stages[0].train, SFTConfig)["learning_rate"] == 2e-5


def test_extends_deep_merges_stages_by_name(tmp_path, good):
    base = write_recipe(tmp_path, good, "base.yaml")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text(
        yaml.safe_dump(
            {"extends": "../base.yaml", "name": "child", "stages": [{"name": "sft", "train": {"max_steps": 2}}]}
        )
    )
    r = load_recipe(child)
    assert r.name == "child" and r.stages[0].train["max_steps"] == 2
    assert r.stages[0].train["save_steps"] == 2 and r.stages[0].adapter.r == 4 and len(r.stages) == 2
    assert base.is_file()


def test_extends_loop(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(tmp_path / "a.yaml")


def test_deep_merge_replaces_plain_lists():
    assert deep_merge({"a": [1, 2], "b": {"c": 1}}, {"a": [3], "b": {"d": 2}}) == {"a": [3], "b": {"c": 1, "d": 2}}


def test_hub_model_plans_with_a_note(tmp_path, good, capsys):
    good["model"] = "someone/not-cached-model"
    assert main(["plan", str(write_recipe(tmp_path, good))]) == 0
    assert "downloaded at run time" in capsys.readouterr().out


def test_hub_model_without_network_fails_fast_on_run(tmp_path, good, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good["model"] = "someone/not-cached-model"
    assert main(["run", str(write_recipe(tmp_path, good))]) == 2  # plan passes; run stops before any stage
    err = capsys.readouterr().err
    assert "cannot fetch `someone/not-cached-model`" in err


def test_every_stage_type_has_help(capsys):
    for cmd in ("plan", "run", "stage"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "overrides" in capsys.readouterr().out


def test_every_registered_stage_type_has_everything():
    """The registry is the one list: each type declares its spec, formats, trainer config and defaults (with a
    reason) as data, implements the interface, and is in the recipe schema."""
    from typing import get_args

    from align.recipe import STAGE_UNION
    from align.stages.base import Default, Stage
    from align.stages.registry import STAGES, stage_type

    assert len({s.name for s in STAGES}) == len(STAGES)
    assert set(get_args(STAGE_UNION)) == {s.spec for s in STAGES}
    for s in STAGES:
        assert stage_type(s.name) is s
        assert get_args(s.spec.model_fields["type"].annotation) == (s.name,), s.name
        for method in ("check", "resolved_config", "run"):
            assert getattr(type(s), method) is not getattr(Stage, method), (s.name, method)
        assert all(isinstance(d, Default) and d.why for d in s.defaults), s.name
        assert isinstance(s.headline({}), str) and s.writes is not None
        if s.trainer_config is not None:
            fields = s.trainer_config.__dataclass_fields__
            assert all(d.key in fields for d in s.defaults), s.name  # a default names a real trainer field
    with pytest.raises(RecipeError, match="did you mean `reward`"):
        stage_type("rewrd")


def _imports_of(path, modules):
    """Every align module a source file imports, function-local (and TYPE_CHECKING) imports included."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("align"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found |= subs or {node.module}  # `from align.ppo import checkpoint` imports the submodule
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("align"))
    return found


def test_no_import_cycle_among_align_modules():
    src = ROOT / "src"
    modules = {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (src / "align").rglob("*.py")
    }
    graph = {m: {i for i in _imports_of(p, modules) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # stages read and write the run folder through align.rundir, never through the orchestrator or the recipe
    for m, deps in graph.items():
        if m.startswith("align.stages"):
            assert not deps & {"align.pipeline", "align.recipe", "align.cli"}, (m, deps)


def test_each_stage_type_name_lives_in_its_own_module():
    """Adding a stage type touches its module and the registry line: its name is written nowhere else."""
    from align.stages.registry import STAGES

    # console.py reads the trainers' log keys, one of which TRL also calls `reward`: a key, not a type switch
    files = [f for f in (ROOT / "src" / "align").rglob("*.py") if f.name != "console.py"]
    for s in STAGES:
        holders = [f for f in files if f'"{s.name}"' in f.read_text() or f"'{s.name}'" in f.read_text()]
        assert len(holders) <= 2, (s.name, [str(f.relative_to(ROOT)) for f in holders])


def test_alpaca_rows_fixture_is_alpaca():
    from align.data import detect_format

    assert detect_format(set(alpaca_rows(1)[0])) == "alpaca"


def test_schema_and_trainer_errors_are_reported_together(tmp_path, good, capsys):
    good["datasets"]["train"]["pth"] = good["datasets"]["train"].pop("path")
    good["stages"][0]["train"]["num_train_epoch"] = 1
    good["stages"][1]["tasks"][0]["strid"] = 3
    err = plan_error(tmp_path, good, capsys)
    assert "datasets.train.pth" in err and "did you mean `path`" in err
    assert "did you mean `num_train_epochs`" in err and "did you mean `stride`" in err


def test_override_of_an_aliased_node_changes_only_that_place():
    """`stages.rm.launch.mode=python` on a launch block shared through a YAML anchor must not switch PPO too."""
    from align.recipe import apply_overrides
    from align.yamlio import load_yaml_text

    data = load_yaml_text(
        "launch: &l {mode: accelerate}\nstages:\n  - {name: rm, launch: *l}\n  - {name: ppo, launch: *l}\n"
    )
    assert data["stages"][0]["launch"] is data["stages"][1]["launch"]  # YAML shares the node
    out = apply_overrides(data, ["stages.rm.launch.mode=python"])
    assert out["stages"][0]["launch"]["mode"] == "python"
    assert out["stages"][1]["launch"]["mode"] == "accelerate"
    assert data["stages"][1]["launch"]["mode"] == "accelerate"  # the input is untouched
