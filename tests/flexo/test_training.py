"""flexo.training: the training loop's pieces (packing, the schedule, the batch order, the loss log) and
golden numbers for the whole loop.

Golden numbers: `test_losses_match_the_golden_file` compares every row of the loss logs the tiny
fixture's public model (models/public/loss.csv) and one expert (models/experts/alpha/loss.csv) recorded
with tests/assets/golden_losses.json: steps, tokens and learning rates exactly, train and validation
losses within 5e-3 absolute (bf16 autocast on CPU). Any change to training — the loop, the schedule,
the batch order, the model, the tokenizer or the tiny data — shows there as a number.

The golden file was generated once from the code as it stood (not written by hand), with

    FLEXO_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/flexo/test_training.py -k golden

which rewrites it from this run's loss logs (and then skips the comparison). Regenerate it that way, and
commit it, only when a change to training is meant. The tiny project's text comes from this Python's
standard library (pydoc topics, `email`, `xml`, `json` and `collections` sources), so the numbers belong
to one Python minor version: on another the test skips, saying so.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import pytest
import torch

from conftest import REPO
from flexo.errors import FlexoError
from flexo.params import TrainParams
from flexo.training import Batches, lr_at, pack, write_loss_log

GOLDEN = REPO / "tests" / "assets" / "golden_losses.json"
TOLERANCE = 5e-3  # absolute, on losses around 3-6 nats: bf16 autocast on CPU, thread counts
RUNS = {"public": "models/public/loss.csv", "expert:alpha": "models/experts/alpha/loss.csv"}
DATA = {"public": "data/curated/public/manifest.json", "alpha": "data/curated/alpha/manifest.json"}


# ---------------------------------------------------------------------------------------- golden numbers
def read_loss_log(path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({"step": int(row["step"]), "tokens": int(row["tokens"]), "lr": float(row["lr"]),
                         "train_loss": None if math.isnan(float(row["train_loss"])) else float(row["train_loss"]),
                         "val_loss": float(row["val_loss"])})
    return rows


def observed(root) -> dict:
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__,
        # what the losses were computed on: the curated train splits' sha256 (from curate's manifests)
        "data_sha256": {name: json.loads((root / rel).read_text())["splits"]["train"]["sha256"]
                        for name, rel in DATA.items()},
        "losses": {name: read_loss_log(root / rel) for name, rel in RUNS.items()},
    }


def dump(golden: dict) -> str:
    """JSON with one loss-log row per line, so that a regenerated file reads as a diff of rows."""
    rows = golden["losses"]
    text = json.dumps({**golden, "losses": {k: f"@{k}@" for k in rows}}, indent=1)
    for k, log in rows.items():
        text = text.replace(f'"@{k}@"', "[\n   " + ",\n   ".join(json.dumps(r) for r in log) + "\n  ]")
    return text + "\n"


def test_losses_match_the_golden_file(tiny_project):
    now = observed(tiny_project.root)
    if os.environ.get("FLEXO_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(dump({"about": "loss.csv rows of the tiny fixture's public model and expert alpha; "
                                         "see tests/flexo/test_training.py", **now}))
        pytest.skip(f"wrote {GOLDEN.relative_to(REPO)}")
    golden = json.loads(GOLDEN.read_text())
    if golden["python"] != now["python"]:
        pytest.skip(f"the golden losses were recorded on Python {golden['python']}, whose standard library is the "
                    f"tiny project's text; this is Python {now['python']}: regenerate them (see the docstring)")
    where = f"(golden: torch {golden['torch']}; here: torch {now['torch']})"
    assert now["data_sha256"] == golden["data_sha256"], f"the tiny project's curated text changed {where}"
    for run, rows in golden["losses"].items():
        got = now["losses"][run]
        assert [(r["step"], r["tokens"]) for r in got] == [(r["step"], r["tokens"]) for r in rows], run
        for want, have in zip(rows, got):
            assert have["lr"] == pytest.approx(want["lr"], rel=1e-9), (run, want["step"])
            for key in ("train_loss", "val_loss"):
                if want[key] is None:
                    assert have[key] is None, (run, want["step"], key)
                else:
                    assert abs(have[key] - want[key]) <= TOLERANCE, \
                        f"{run} step {want['step']} {key}: {have[key]:.4f}, golden {want[key]:.4f} {where}"


def test_the_golden_runs_learned():
    """The golden numbers themselves describe training that works (a file regenerated from a broken loop
    would fail here): the public model's validation loss falls well below its start, the expert's below
    the public model's (its start), and every row after the first has a training loss."""
    golden = json.loads(GOLDEN.read_text())
    public, expert = golden["losses"]["public"], golden["losses"]["expert:alpha"]
    assert [r["step"] for r in public] == [0, 10, 20, 30] and [r["step"] for r in expert] == [0, 4, 8, 12]
    assert public[-1]["val_loss"] < public[0]["val_loss"] - 0.3
    assert expert[-1]["val_loss"] < expert[0]["val_loss"]
    for rows in (public, expert):
        assert rows[0]["train_loss"] is None and all(r["train_loss"] is not None for r in rows[1:])


# ----------------------------------------------------------------------------------------------- pieces
class FakeTokenizer:
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[len(t) + i for i in range(len(t))] for t in texts]}


def test_pack_joins_documents_with_eos_and_cuts_whole_blocks():
    blocks = pack(FakeTokenizer(), ["abc", "de"], 3, "train")  # ids [3, 4, 5] and [2, 3]
    assert blocks.dtype == torch.long and blocks.tolist() == [[3, 4, 5], [0, 2, 3]]  # the last EOS is cut
    with pytest.raises(FlexoError, match="val: 3 tokens are fewer than one sequence of 4: add documents"):
        pack(FakeTokenizer(), ["ab"], 4, "val")


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    tp = TrainParams(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(s, 10, tp) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, 10, tp) == pytest.approx(1.0)
    assert lr_at(6, 10, tp) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_at(10, 10, tp) == pytest.approx(0.1) and lr_at(50, 10, tp) == pytest.approx(0.1)


def test_batch_order_is_seeded_covers_every_block_per_epoch_and_mixes():
    blocks = torch.arange(12).view(6, 2)
    a, b = Batches(blocks, 3, seed=7), Batches(blocks, 3, seed=7)
    epoch = torch.cat([a.batch(0), a.batch(1)])
    assert torch.equal(epoch, torch.cat([b.batch(0), b.batch(1)]))  # the same seed, the same order
    assert sorted(epoch[:, 0].tolist()) == [0, 2, 4, 6, 8, 10]  # every block once in the first epoch
    assert not torch.equal(epoch, torch.cat([Batches(blocks, 3, seed=8).batch(s) for s in (0, 1)]))
    assert a.total_steps(TrainParams(epochs=2.0)) == 4 and a.total_steps(TrainParams(epochs=2.0, max_steps=3)) == 3
    mix = torch.full((5, 2), -1)
    mixed = Batches(blocks, 4, seed=0, mix=mix, mix_fraction=0.25)
    assert (mixed.n_own, mixed.n_mix) == (3, 1)
    assert (mixed.batch(0)[:, 0] == -1).tolist() == [False, False, False, True]  # own rows first, then public


def test_loss_log_rounds_floats_and_keeps_the_columns(tmp_path):
    write_loss_log(tmp_path / "loss.csv", [{"step": 0, "tokens": 0, "lr": 0.0, "train_loss": float("nan"),
                                            "val_loss": 6.2383291},
                                           {"step": 10, "tokens": 640, "lr": 0.00123456789, "train_loss": 5.1,
                                            "val_loss": 4.9}])
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines == ["step,tokens,lr,train_loss,val_loss", "0,0,0.0,nan,6.238329", "10,640,0.001235,5.1,4.9"]
    assert read_loss_log(tmp_path / "loss.csv")[0]["train_loss"] is None
