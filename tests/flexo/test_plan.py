"""`flexo plan` (flexo/plan.py, stages/plan.py), with no GPU: the figures against hand computations
(parameter counts equal transformers' FlexOlmo and the published OLMo-2 sizes; model states are DeepSpeed's
own estimate plus flexo's fp32 weights; activations and time follow the stated formulas); from the command
line, the presets and the demo plan, a plan that does not fit prints its table and exits 2 with one line
naming the stage and what to change, bad flags are one line each. Also flexo/ds_backend.py's choice of config
(`deepspeed_config`) and its ZeRO-3 refusal, here because tests/flexo/test_ds_backend.py is opt-in (it runs
DeepSpeed) and these tests do not.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest
import yaml

from conftest import REPO, cli_env, flexo_command, run_cli
from flexo.errors import FlexoError
from flexo.params import ModelParams, TrainParams, load_params
from flexo.plan import GB, NOT_RUNNABLE, Hardware, Shape, make_plan, model_shape

OLMO2 = {  # the published configs (config.json of allenai/OLMo-2-0425-1B and allenai/OLMo-2-1124-7B)
    "olmo2-1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 16, "intermediate_size": 8192},
    "olmo2-7b": {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "intermediate_size": 11008},
}
VOCAB = 100352
DEMO = REPO / "params.yaml"
PRESET_1B = REPO / "configs" / "olmo2-1b.yaml"
PRESET_7B = REPO / "configs" / "olmo2-7b.yaml"
STAGES = ("train_public", "train_expert", "merge", "router_tune", "evaluate")


def preset(name: str):
    return load_params(REPO / "configs" / f"{name}.yaml")


def keys(tree: dict, prefix: str = "") -> set[str]:
    return {prefix + k for k in tree} | {x for k, v in tree.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")}


def stage_row(plan, stage: str):
    return next(r for r in plan.rows if r.stage == stage)


@pytest.mark.parametrize("name", sorted(OLMO2))
def test_presets_are_complete_params_files_with_olmo2_shapes(name):
    params = preset(name)
    assert {k: getattr(params.model, k) for k in OLMO2[name]} == OLMO2[name]
    m = params.model
    assert (m.max_seq_len, m.rope_theta, m.rms_norm_eps, params.tokenizer.vocab_size) == (4096, 500000.0, 1e-6, VOCAB)
    assert m.init_from.startswith("checkpoints/OLMo-2-")
    for tp in (params.train_public, params.train_expert):
        assert tp.backend == "deepspeed" and (REPO / tp.deepspeed_config).is_file()
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    assert keys(raw) == keys(yaml.safe_load((REPO / "params.yaml").read_text()))  # every key written out


def test_parameter_counts_equal_transformers_flexolmo():
    from flexo.modeling import count_params, model_config, new_model

    m = ModelParams(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)
    shape = Shape(vocab=96, hidden=32, layers=2, heads=4, ffn=48)
    for experts in (1, 2, 5):
        model = new_model(model_config(m, vocab_size=96, pad_id=0, eos_id=1, num_experts=experts, top_k=1))
        assert shape.params(experts) == count_params(model), experts


def test_olmo2_sizes_are_the_published_ones():
    h, layers, ffn = 4096, 32, 11008
    by_hand = 2 * VOCAB * h + layers * (4 * h * h + 4 * h + 3 * h * ffn) + h  # dense OLMo-2 7B, untied head
    for name, published in (("olmo2-7b", 7.30e9), ("olmo2-1b", 1.48e9)):
        shape, source = model_shape(preset(name))
        dense = shape.params(1) - shape.hidden * shape.layers  # flexo's 1-expert model adds one router row per layer
        assert abs(dense / published - 1) < 0.01, (name, dense)
        assert source == "tokenizer.vocab_size"  # init_from's folder is not there in the tests
    assert model_shape(preset("olmo2-7b"))[0].params(1) - h * layers == by_hand == 7_298_617_344


def test_expert_memory_is_deepspeeds_zero2_estimate_plus_flexos_fp32_weights():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    row = stage_row(make_plan(preset("olmo2-7b"), Hardware(gpus=8, gpu_mem_gb=141)), "train_expert")
    h, layers, ffn, seq, micro = 4096, 32, 11008, 4096, 16 // 8
    trainable = 2 * (3 * h * ffn + h) * layers  # both experts' fused FFN tensors and router rows
    frozen = 2 * VOCAB * h + layers * (4 * h * h + 4 * h) + h
    _, ds_gpu = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
    states = ds_gpu + 2 * trainable + 4 * frozen  # fp32 trainable weights (estimator: 16-bit) + frozen fp32 weights
    activations = layers * seq * micro * h * (34 + 19) + micro * seq * VOCAB * 6  # top-2: the MLP share twice
    assert row.gpu == states + activations
    assert 127 * GB < row.gpu < 128 * GB and row.runnable


def test_zero3_is_planned_with_deepspeeds_estimate_but_marked_not_runnable():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params = preset("olmo2-7b")
    params.train_expert = dataclasses.replace(params.train_expert, deepspeed_config="configs/deepspeed_zero3.json")
    plan = make_plan(params, Hardware(gpus=8, gpu_mem_gb=80))
    row = stage_row(plan, "train_expert")
    shape = model_shape(params)[0]
    trainable = 2 * (shape.expert + shape.hidden * shape.layers)
    frozen = shape.params(2) - trainable
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(trainable, VOCAB * 4096, num_gpus_per_node=8, num_nodes=1,
                                                         cpu_offload=False, cpu_offload_params=False)
    activations = shape.activation_bytes(4096, 2, 2, layers=32)
    assert row.gpu == int(ds_gpu + (2 * trainable + 4 * frozen) / 8) + activations  # weights partitioned too
    assert not row.runnable and NOT_RUNNABLE in plan.verdict()


def test_time_is_tokens_over_throughput_from_6_n_active_at_40_percent_mfu():
    params = preset("olmo2-1b")
    row = stage_row(make_plan(params, Hardware(gpus=8)), "train_expert")
    shape = model_shape(params)[0]
    active = shape.params(2) - VOCAB * 2048  # top-2 of 2: every weight but the input embedding
    tokens = 4e9 / 4 / (24 / 32)  # owner_train_chars / 4, over the own rows of a batch (8 of 32 are public_mix)
    assert row.seconds == pytest.approx(tokens / (0.4 * 989e12 / (6 * active) * 8))
    measured = stage_row(make_plan(params, Hardware(gpus=8, tokens_per_s_per_gpu=1000)), "train_expert")
    assert measured.seconds == pytest.approx(tokens / 8000)


# ---------------------------------------------------------------------------------- the command line
def flexo_plan(tmp_path, params, *args):
    """`flexo --params PARAMS plan ARGS` with a scratch root (the CLI records its run time under the root)."""
    return run_cli(["--root", str(tmp_path), "--params", str(params), "plan", *args])


def test_the_demo_plans_fine_on_one_gpu(tmp_path):
    r = flexo_plan(tmp_path, DEMO)
    assert r.rc == 0, r.err
    table = r.out.splitlines()
    assert table[0] == f"flexo plan: {DEMO} on 1 GPU of 80 GB"
    assert [line.split()[0] for line in table if line.startswith(STAGES)] == list(STAGES)
    assert "formulas:" in r.out and "Korthikanti" in r.out and "estimate_zero{2,3}_model_states_mem_needs" in r.out
    assert table[-1].startswith("verdict: fits: every stage within 80 GB per GPU")


@pytest.mark.parametrize("preset, gpu_mem", [(PRESET_1B, "80"), (PRESET_7B, "141")])
def test_each_preset_fits_the_node_its_header_names(tmp_path, preset, gpu_mem):
    assert f"plan --gpus 8 --gpu-mem {gpu_mem}" in preset.read_text()
    r = flexo_plan(tmp_path, preset, "--gpus", "8", "--gpu-mem", gpu_mem)
    assert r.rc == 0, r.err
    assert "converted from checkpoints/OLMo-2-" in r.out  # init_from: no public training
    assert "verdict: fits" in r.out


def test_a_plan_that_does_not_fit_shows_the_table_and_one_line_naming_the_stage_and_parameter(tmp_path):
    r = flexo_plan(tmp_path, PRESET_1B, "--gpus", "8", "--gpu-mem", "45")
    assert r.rc == 2
    assert r.err.count("\n") == 1 and r.err.startswith("flexo: error: plan: train_expert needs 51.1 GB per GPU on "
                                                       "8 GPUs of 45 GB: ")
    assert "raise --gpus to 16" in r.err and "lower train_expert.batch_size (32) to 24" in r.err
    assert "verdict: does not fit" in r.out and "train_expert" in r.out  # the table came first, on stdout


def test_the_console_script_refuses_the_7b_preset_on_80_gb_and_names_zero3_offload():
    r = subprocess.run([*flexo_command(), "--params", str(PRESET_7B), "plan", "--gpus", "8", "--gpu-mem", "80"],
                       check=False, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr[-500:]
    assert r.stderr.count("\n") == 1 and "plan: train_expert needs" in r.stderr
    assert "train_expert.deepspeed_config: configs/deepspeed_zero3_offload.json" in r.stderr
    assert "evaluate does not fit either" in r.stderr


def test_a_zero3_preset_is_planned_and_marked_not_runnable(tmp_path):
    raw = yaml.safe_load(PRESET_7B.read_text())
    raw["train_expert"]["deepspeed_config"] = "configs/deepspeed_zero3_offload.json"
    params = tmp_path / "zero3.yaml"
    params.write_text(yaml.safe_dump(raw))
    r = flexo_plan(tmp_path, params, "--gpus", "8", "--gpu-mem", "141")
    assert r.rc == 0, r.err
    assert "ZeRO-3, optimizer + params offloaded to CPU" in r.out
    assert "train_expert: planned, not runnable by flexo's backend yet" in r.out


def test_json_output_carries_the_numbers(tmp_path):
    r = flexo_plan(tmp_path, PRESET_1B, "--gpus", "8", "--tokens-per-s-per-gpu", "10000", "--json")
    assert r.rc == 0, r.err
    out = json.loads(r.out)
    assert out["fits"] is True and [s["stage"] for s in out["stages"]] == list(STAGES)
    expert = out["stages"][1]
    assert expert["seconds"] == pytest.approx(4e9 / 4 / 0.75 / (10000 * 8))  # own text / the own share of a batch
    assert 51 * 10**9 < expert["gpu"] < 52 * 10**9


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0"], "plan: --gpus must be a whole number of at least 1, got 0"),
    (["--gpu-mem", "-1"], "plan: --gpu-mem must be a positive number, got -1.0"),
    (["--gpu-mem", "nan"], "plan: --gpu-mem must be a positive number, got nan"),
    (["--tokens-per-s-per-gpu", "0"], "plan: --tokens-per-s-per-gpu must be a positive number"),
    (["--gpus", "3"], "plan: train_public.batch_size (16) must be divisible by --gpus (3)"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    r = flexo_plan(tmp_path, DEMO, *args)
    assert r.rc == 2 and r.out == ""
    assert r.err.count("\n") == 1 and r.err.startswith(f"flexo: error: {message}"), r.err


# ------------------------------------------------------------------------------ ds_backend's config
def test_the_deepspeed_config_comes_from_params_then_the_environment_then_the_default(monkeypatch, tmp_path):
    from flexo.ds_backend import CONFIG_ENV, DEFAULT_CONFIG, PROJECT_ROOT, config_path, ds_config

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert config_path(TrainParams()) == DEFAULT_CONFIG
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env.json"))
    assert config_path(TrainParams()) == tmp_path / "env.json"
    named = TrainParams(deepspeed_config="configs/deepspeed_zero3.json")
    assert config_path(named) == PROJECT_ROOT / "configs" / "deepspeed_zero3.json"  # the key wins, from the root
    assert config_path(named, tmp_path / "given.json") == tmp_path / "given.json"
    with pytest.raises(FlexoError, match="nope.json is missing: point deepspeed_config"):
        ds_config(TrainParams(deepspeed_config="configs/nope.json"), 1)


@pytest.mark.parametrize("config", ["configs/deepspeed_zero3.json", "configs/deepspeed_zero3_offload.json"])
def test_zero3_is_refused_at_run_time_in_one_line(config):
    from flexo.ds_backend import ds_config

    with pytest.raises(FlexoError) as e:
        ds_config(TrainParams(deepspeed_config=config), 1)
    assert "\n" not in str(e.value)
    assert "stage is 3" in str(e.value) and "runs ZeRO stage <= 2" in str(e.value)
    assert "use configs/deepspeed_zero2.json" in str(e.value)


def test_every_shipped_deepspeed_config_is_complete_but_for_its_stage(monkeypatch):
    """With the stage limit lifted, each config fills every "auto" from params and keeps bf16/fp16 off."""
    from flexo import ds_backend

    monkeypatch.setattr(ds_backend, "MAX_ZERO_STAGE", 3)
    tp = TrainParams(batch_size=8, lr=1e-4)
    for path in sorted((REPO / "configs").glob("deepspeed_*.json")):
        cfg = ds_backend.ds_config(tp, 2, path)
        assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"]) == (8, 4), path.name
        assert cfg["optimizer"]["params"]["lr"] == 1e-4 and cfg["torch_autocast"]["enabled"] is True
