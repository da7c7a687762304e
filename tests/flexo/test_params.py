"""params.yaml → typed dataclasses: defaults load, and every bad value is a one-line error naming the key."""

import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from flexo.errors import FlexoError
from flexo.params import Params, load_params, params_from_dict


def test_project_params_load_and_match_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.owners == ["code", "math", "news", "creative"]
    # Every key in params.yaml is documented with a comment on its line.
    for line in (REPO / "params.yaml").read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"undocumented params key: {line}"
    assert params.model.hidden_size % params.model.num_heads == 0


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"bogus": 1}, "unknown key bogus"),
        ({"curate": {"chunk_chars": 10, "nope": 2}}, "unknown key curate.nope"),
        ({"curate": {"min_doc_chars": "many"}}, "curate.min_doc_chars must be an integer"),
        ({"train_expert": {"lr": -1}}, "train_expert.lr must be > 0"),
        ({"train_expert": {"public_mix": 1.5}}, "train_expert.public_mix must be <= 0.9"),
        ({"train_public": {"bf16": "yes"}}, "train_public.bf16 must be true or false"),
        ({"train_public": {"backend": "gpu"}}, "train_public.backend must be one of"),
        ({"owners": ["../x"]}, "'../x' is not allowed"),
        ({"owners": ["A B"]}, "'A B' is not allowed"),
        ({"owners": ["code", "code"]}, "listed twice"),
        ({"owners": ["public"]}, "must not contain 'public'"),
        ({"owners": []}, "owners is empty"),
        ({"model": {"hidden_size": 100, "num_heads": 3}}, "divisible"),
    ],
)
def test_bad_params_are_one_line_errors(raw, fragment):
    with pytest.raises(FlexoError) as e:
        params_from_dict(raw)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_ints_accepted_for_floats_and_defaults_fill_in():
    p = params_from_dict({"train_expert": {"lr": 1}})
    assert p.train_expert.lr == 1.0 and isinstance(p.train_expert.lr, float)
    assert p.train_expert.batch_size == Params().train_expert.batch_size


def test_check_owner_refuses_unknown_and_malformed():
    p = params_from_dict({})
    assert p.check_owner("public", allow_public=True) == "public"
    with pytest.raises(FlexoError, match="unknown owner 'legal'"):
        p.check_owner("legal")
    with pytest.raises(FlexoError, match="not allowed"):
        p.check_owner("../etc")


def test_cli_reports_bad_params_in_one_line(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["curate"]["typo_key"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "flexo.cli", "--root", str(tmp_path), "curate", "--owner", "code"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == "flexo: error: params.yaml: unknown key curate.typo_key; known keys of curate: " \
        "public_train_chars, owner_train_chars, val_fraction, test_fraction, max_eval_chars, min_doc_chars, " \
        "chunk_chars, near_dedup"
