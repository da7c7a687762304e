"""flexo.model_files: a model folder's config read and rewritten as JSON, as transformers writes it, and
refused in one line when it is not a flex_olmo config the merge can use."""

from __future__ import annotations

import json

import pytest

from flexo.errors import FlexoError
from flexo.model_files import read_config_json, with_experts_json, write_config_json


def test_the_json_config_is_what_transformers_writes_for_the_same_change(ctx, tmp_path):
    from flexo.modeling import load_config, with_experts

    _, layout = ctx
    write_config_json(with_experts_json(read_config_json(layout.public_model), 5, 2), tmp_path / "json")
    reference = with_experts(load_config(layout.public_model), 5, 2)
    reference.norm_topk_prob, reference.architectures = False, ["FlexOlmoForCausalLM"]
    reference.save_pretrained(tmp_path / "transformers")
    assert (tmp_path / "json" / "config.json").read_bytes() == (tmp_path / "transformers" / "config.json").read_bytes()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "holds a 'llama' model, not flex_olmo"),
    ({"num_experts": 0}, "num_experts must be a positive integer, got 0"),
    ({"hidden_size": "384"}, "hidden_size must be a positive integer, got '384'"),
    ({"intermediate_size": True}, "intermediate_size must be a positive integer, got True"),
])
def test_a_config_the_merge_cannot_use_is_one_line(ctx, tmp_path, change, message):
    _, layout = ctx
    config = json.loads((layout.public_model / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FlexoError, match=message):
        read_config_json(tmp_path)
    with pytest.raises(FlexoError, match="top-k 3 is out of range"):
        with_experts_json(config, 2, 3)
