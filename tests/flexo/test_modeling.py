"""flexo.modeling: a model folder's config, tokenizer and flexo.json are loaded or refused in one line
naming the file and the fix; flexo.json's types are checked; a stage's model folder replaces only an
earlier model folder of its own kind."""

from __future__ import annotations

import json
import shutil

import pytest

from flexo.errors import FlexoError
from flexo.modeling import load_config, load_tokenizer_from, model_guard, model_kind, read_meta


@pytest.fixture
def model_dir(tiny_project, tmp_path):
    """A copy of the tiny project's public model folder, to break."""
    return shutil.copytree(tiny_project.public_model, tmp_path / "public")


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    return str(e.value)


def test_load_config_of_a_real_folder(model_dir):
    config = load_config(model_dir)
    assert config.model_type == "flex_olmo" and config.num_experts == 1 and config.hidden_size == 32


@pytest.mark.parametrize("text, words", [
    (None, "is not a model folder (no config.json): run the stage that writes it first"),
    ("{", "config.json is not valid JSON"),
    ('["a list"]', "holds list"),
    (lambda c: dict(c, num_hidden_layers="two"), "config.json is not a valid model config ("),
    (lambda c: {"model_type": "gpt2"}, "holds a 'gpt2' model, not flex_olmo: convert it with train-public"),
])
def test_load_config_refusals_are_one_line(model_dir, text, words):
    path = model_dir / "config.json"
    if text is None:
        path.unlink()
    elif callable(text):
        path.write_text(json.dumps(text(json.loads(path.read_text()))))
    else:
        path.write_text(text)
    with pytest.raises(FlexoError) as e:
        load_config(model_dir)
    assert words in _one_line(e)


def test_load_tokenizer_from_a_broken_folder_is_one_line(tiny_project, tmp_path):
    tok = load_tokenizer_from(tiny_project.tokenizer)
    assert tok.pad_token_id != tok.eos_token_id and len(tok) == 512
    broken = shutil.copytree(tiny_project.tokenizer, tmp_path / "tok")
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(FlexoError) as e:
        load_tokenizer_from(broken, fix="rerun `flexo tokenizer`")
    msg = _one_line(e)
    assert msg.startswith(f"the tokenizer in {broken} cannot be loaded (") and msg.endswith("): rerun `flexo tokenizer`")


def test_read_meta_of_a_real_folder(tiny_project):
    meta = read_meta(tiny_project.public_model)
    assert meta["kind"] == "public" and meta["experts"] == ["public"] and len(meta["fingerprint"]) == 64


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.__setitem__("experts", 5), "experts must be a JSON list, got 5"),
    (lambda m: m.__setitem__("top_k", True), "top_k must be a JSON int, got True"),  # bool is not an int here
    (lambda m: m.__setitem__("top_k", 2.0), "top_k must be a JSON int, got 2.0"),
    (lambda m: m.__setitem__("packages", [1]), "packages must be a JSON dict"),
    (lambda m: m.__setitem__("experts", ["alpha", "public"]), "experts must be owner names with 'public' first"),
    (lambda m: m.__setitem__("opted_out", ["../x"]), "experts must be owner names with 'public' first"),
    (lambda m: m.__setitem__("experts", ["public", 7]), "experts must be owner names"),
])
def test_read_meta_checks_the_types_later_stages_read(model_dir, edit, words):
    path = model_dir / "flexo.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(FlexoError) as e:
        read_meta(model_dir)
    msg = _one_line(e)
    assert words in msg and str(path) in msg and msg.endswith("rerun the stage that wrote it")
    assert model_kind(model_dir) is None  # unreadable: of no kind, so no stage replaces it


def test_model_guard_replaces_only_its_own_kind(model_dir, tmp_path):
    guard = model_guard("public", "public model", "flexo train-public")
    guard.check(tmp_path / "absent")
    guard.check(model_dir)  # an earlier public model: may be replaced
    assert model_kind(model_dir) == "public"
    with pytest.raises(FlexoError, match="not an earlier merged model.*rerun `flexo merge`"):
        model_guard("merged", "merged model", "flexo merge").check(model_dir)
    (model_dir / "notes.txt").write_text("mine")
    with pytest.raises(FlexoError, match="holds notes.txt, which flexo did not write"):
        guard.check(model_dir)
    (model_dir / "notes.txt").unlink()
    with pytest.raises(FlexoError, match="is this command's input"):
        model_guard("public", "public model", "flexo train-public", inputs=[model_dir]).check(model_dir)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert model_kind(plain) is None
    with pytest.raises(FlexoError, match="it is a folder that is not an earlier public model"):
        guard.check(plain)
