"""Multi-class tasks end to end on the tiny BERT: a 3-class run delivered to the edge, the head and its bits sized by
the data's classes, and one clear error (exit 2, no run folder) for each kind of bad label."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from airlora.cli import main
from airlora.config import merge
from airlora.session import build_session
from tests.test_bad_input import fails, run_args
from tests.tiny_models import tiny_config as tiny_model_config

HIDDEN = tiny_model_config("bert").hidden_size
"""d_h of the tiny BERT: its classifier is a K × d_h matrix and a K-vector."""
WORDS = {0: ["bad", "awful", "dull"], 1: ["film", "movie", "a"], 2: ["good", "great", "fun"]}


def write_csv(path: Path, rows: list[tuple[str, object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def three_class_rows(n: int = 150) -> list[tuple[str, int]]:
    """n sentences, class i % 3: negative words -> 0, plain statements -> 1, positive words -> 2."""
    rows = []
    for i in range(n):
        label, word = i % 3, WORDS[i % 3][(i // 3) % 3]
        rows.append((f"the movie was very {word}" if label != 1 else f"the {word} is a film", label))
    return rows


@pytest.fixture(scope="module")
def three_class_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("three") / "three.csv", three_class_rows())


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory, tiny_files, three_class_csv) -> Path:
    """A 3-class `random` run on a generous link (ranks differ per module), through the CLI."""
    out = tmp_path_factory.mktemp("three-run") / "run"
    args = run_args(tiny_files, out, **{"--data": three_class_csv, "--steps": 24, "--eval-every": 8,
                                        "--allocator": "random", "--snr-db": "20", "--bandwidth-hz": "1000000"})
    threads = torch.get_num_threads()
    assert main([*args, "--set", "train.lr=0.05", "--set", "train.head_lr=0.05"]) == 0
    torch.set_num_threads(threads)  # the run set it from its config
    return out


def test_three_class_run_export_edge(three_class_run, tiny_files, tmp_path, capsys):
    summary = json.loads((three_class_run / "summary.json").read_text())
    assert summary["num_labels"] == 3
    with safe_open(str(three_class_run / "adapter.safetensors"), "pt") as handle:
        head = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys() if key.startswith("head.")}
    assert head == {"head.classifier.weight": (3, HIDDEN), "head.classifier.bias": (3,)}
    assert summary["head_params"] == 3 * HIDDEN + 3
    assert sum(summary["ranks"].values()) > 0  # triplets were delivered, not the head alone

    adir = tmp_path / "adir"
    assert main(["export", str(three_class_run), "--out", str(adir)]) == 0
    manifest = json.loads((adir / "delivery.json").read_text())
    record = json.loads((adir / "delivery_record.json").read_text())
    assert manifest["num_labels"] == 3
    assert np.array(record["reference"]["logits"]).shape == (20, 3)  # the tiny config's 20 test sentences
    # the bits the run budgeted are the bytes the export wrote, the 3-way head included
    assert summary["transmitted_bits"] == 8 * (record["payload_bytes"] + record["scale_bytes"])
    assert record["overhead_bytes"] <= summary["delivery_overhead_bytes"]
    card = (adir / "README.md").read_text()
    assert "3-class sentence classification" in card and "num_labels=3)" in card

    capsys.readouterr()
    assert main(["edge", str(adir), "--base", str(tiny_files[0])]) == 0
    edge = json.loads(capsys.readouterr().out)
    assert edge["test_accuracy"] == edge["cloud_test_accuracy"] == summary["test_accuracy"]
    assert edge["accuracy_drop"] == 0 and edge["max_abs_logit_diff"] < 1e-4
    # the three classes were learned, so the equality above is about a working 3-way classifier
    assert edge["test_accuracy"] > summary["majority_baseline_accuracy"] + 0.2

    manifest["num_labels"] = 1  # not checksummed: the edge checks it itself
    (adir / "delivery.json").write_text(json.dumps(manifest))
    err = fails(capsys, "edge", adir, "--base", tiny_files[0])
    assert err == ("airlora: error: delivery.json: num_labels 1 is not an integer >= 2; the manifest was changed "
                   "after export, so nothing is attached")


def head_wire_bits(bits: int, k: int) -> int:
    """Bits of a K × d_h weight and a K bias at ``bits``, from the wire format written out: floats as they are;
    integer codes with one bf16 scale per 64 values of a row (int4 two per byte), a bias being one row."""
    if bits in (32, 16):
        return bits * (k * HIDDEN + k)
    row = lambda d: 8 * math.ceil(d * bits / 8) + 16 * math.ceil(d / 64)  # noqa: E731
    return k * row(HIDDEN) + row(k)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_the_head_and_its_bits_in_the_budget_follow_the_classes(tiny_config, three_class_csv, bits, one_thread):
    binary = build_session(merge(tiny_config, {"channel.bits": [bits]}))
    three = build_session(merge(tiny_config, {"channel.bits": [bits], "data.source": str(three_class_csv)}))
    for session, k in ((binary, 2), (three, 3)):
        assert session.splits.num_labels == k
        assert session.model.config.num_labels == k
        assert {name: tuple(p.shape) for name, p in session.head.items()} == {
            "classifier.weight": (k, HIDDEN), "classifier.bias": (k,)}
        budget = session.budget(5.0)
        nothing = dict.fromkeys(session.module_map.names, 0)
        assert budget.bits(nothing) - 8 * session.overhead_bytes == head_wire_bits(bits, k)
    # the manifest of a 3-class delivery carries num_labels; its reserve covers that
    assert three.overhead_bytes >= binary.overhead_bytes


@pytest.mark.parametrize(("rows", "message"), [
    ([("good", 1), ("bad", "maybe"), ("ok", 1.5)],
     "column 'label' has 2 value(s) that are not class labels ('maybe', '1.5'); allowed: integers 0..K-1"),
    ([("good", 0), ("bad", 2)] * 20,
     "column 'label' of its train split has classes 0, 2 but no example of 1; allowed: integers 0..K-1"),
    ([("good", 1)] * 40,
     "column 'label' of its train split holds a single class (1); a classifier needs at least two"),
    ([("good", "positive"), ("bad", "negative"), ("meh", "neutral")],
     "column 'label' has 1 value(s) that are not class labels ('neutral')"),
])
def test_bad_labels_exit_2_and_write_no_run(tiny_files, tmp_path, capsys, rows, message):
    data = write_csv(tmp_path / "labels.csv", rows)
    out = tmp_path / "out"
    err = fails(capsys, *run_args(tiny_files, out, **{"--data": data}))
    assert message in err and str(data) in err
    assert not out.exists()


def test_a_test_label_the_train_split_lacks_exits_2(tiny_files, tmp_path, capsys):
    glue = tmp_path / "glue"
    glue.mkdir()
    write_tsv = lambda name, rows: (glue / name).write_text(  # noqa: E731
        "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows))
    write_tsv("train.tsv", [("the film was bad", 0), ("a great film", 1)] * 20)
    write_tsv("dev.tsv", [("the film was bad", 0), ("a great film", 1), ("the film is a movie", 2)])
    out = tmp_path / "out"
    err = fails(capsys, *run_args(tiny_files, out, **{"--data": glue}))
    assert (f"data.source '{glue}': the test split read from it has label(s) 2 that the train split lacks (train "
            "has 0, 1); every class needs training examples") in err
    assert not out.exists()
