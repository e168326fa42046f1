"""``airlora export`` writes README.md, a model card, beside the PEFT adapter: it names the base model and the ranks and
bits that are in the written adapter_config.json and delivery.json, and PEFT still loads the folder."""

import json
import re
import shlex

import pytest
import yaml

from airlora.cli import main
from airlora.exported_run import RunAdapter
from airlora.models import load_model
from tests import reference


def card_table(card: str) -> dict[str, tuple[int, int | None]]:
    """The card's rank table: "layers.{i}.{module}" -> (rank, bits or None)."""
    lines = [line for line in card.splitlines() if line.startswith("| ")]
    modules = [cell.strip() for cell in lines[0].strip("|").split("|")][1:]
    table = {}
    for line in lines[1:]:
        layer, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        for module, cell in zip(modules, cells, strict=True):
            rank, _, bits = cell.partition(" @ ")
            table[f"layers.{layer}.{module}"] = (int(rank), int(bits) if bits else None)
    return table


@pytest.fixture
def exported(tiny_files, tmp_path):
    """A tiny `airlora run` from the command line, its adapter given mixed ranks and fp16/fp32 precisions, exported."""
    model, data, config_file = tiny_files
    run_argv = [
        "run",
        "--config",
        str(config_file),
        "--model",
        str(model),
        "--data",
        str(data),
        "--allocator",
        "random",
        "--steps",
        "4",
        "--bandwidth-hz",
        "1e6",
        "--snr-db",
        "20",
        "--r-max",
        "4",
        "--quiet",
        "--report-to",
        "none",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(run_argv) == 0
    keys = sorted(RunAdapter(tmp_path / "run").ranks)
    ranks = {key: [0, 4, 1, 2, 3, 0][i % 6] for i, key in enumerate(keys)}
    precisions = {key: [16, 32][i % 2] for i, key in enumerate(keys)}
    reference.with_ranks(tmp_path / "run", ranks, precisions=precisions, head_bits=32)
    export_argv = ["export", str(tmp_path / "run"), "--out", str(tmp_path / "adir")]
    assert main(export_argv) == 0
    return tmp_path, shlex.join(["airlora", *run_argv]), shlex.join(["airlora", *export_argv])


@pytest.mark.integration
@pytest.mark.filterwarnings(
    "ignore:The following rank_pattern keys did not match",  # AdaLoRA's masks, see edge.py
    "ignore:.*is_gradient_checkpointing.*is deprecated",
)
def test_the_card_describes_the_written_delivery_and_peft_loads_the_folder(exported):
    from peft import PeftModel

    root, run_command, export_command = exported
    adir = root / "adir"
    card = (adir / "README.md").read_text()
    config = json.loads((adir / "adapter_config.json").read_text())
    sent = json.loads((adir / "delivery.json").read_text())
    record = json.loads((adir / "delivery_record.json").read_text())
    assert sent["payload_file"] == "adapter_model.safetensors"  # fp16/fp32: the file PEFT reads

    # the hub's YAML front matter
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and "peft" in front["tags"]
    assert "base_model" not in front  # a local folder: no hub id known, and the hub would refuse a path
    assert config["base_model_name_or_path"] in card.split("---\n", 2)[2]

    # the ranks and bits of the card are those in delivery.json and in adapter_config.json's rank_pattern
    table = card_table(card)
    assert {key: rank for key, (rank, _) in table.items()} == sent["ranks"]
    assert {key: bits for key, (rank, bits) in table.items() if rank} == {
        key: sent["precisions"][key] for key, rank in sent["ranks"].items() if rank
    }
    assert {bits for _, bits in table.values() if bits} == {16, 32}
    assert sorted(sum(mask) for mask in config["rank_pattern"].values()) == sorted(r for r, _ in table.values() if r)
    assert len(config["target_modules"]) == sum(1 for r, _ in table.values() if r)
    assert f"{record['on_air_bits']:,} bits" in card and f"airtime {record['airtime_s']:.4f} s" in card
    assert f"{record['cloud_test_accuracy']:.4f} (of this delivery" in card
    assert f"run: `{run_command}`" in card and f"export: `{export_command}`" in card

    # PEFT loads the folder as a hub upload would lay it out, the card beside the adapter
    model = PeftModel.from_pretrained(load_model(config["base_model_name_or_path"])[0].eval(), str(adir))
    names = RunAdapter(root / "run").module_names
    for key, (rank, _) in table.items():
        module = model.base_model.model.get_submodule(names[key])
        assert (module.lora_A["default"].shape[0] if rank else 0) == rank, key


@pytest.mark.integration
def test_a_quantised_export_s_card_says_peft_cannot_load_it_as_is(exported):
    root, _, _ = exported
    assert main(["export", str(root / "run"), "--bits", "8", "--out", str(root / "int8")]) == 0
    card = (root / "int8" / "README.md").read_text()
    assert "`adapter_model.quantised.safetensors`" in card and "PEFT cannot load" in card
    assert re.search(r"modules at 8 bits per value, the head at 8\.", card)
    assert {bits for _, bits in card_table(card).values()} == {None}  # one precision: ranks only
    assert "(of the run's own precisions, not of this export's)" in card


def test_the_base_model_is_named_by_its_hub_id_when_one_is_known(tmp_path):
    from airlora.model_card import base_model_id

    assert base_model_id("minilm", "/anywhere/model") == "sentence-transformers/all-MiniLM-L6-v2"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "facebook/opt-1.3b"}))
    assert base_model_id(str(tmp_path), str(tmp_path)) == "facebook/opt-1.3b"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/opt"}))
    assert base_model_id(str(tmp_path), str(tmp_path)) == str(tmp_path)  # a path is no hub id: the folder


@pytest.mark.integration
def test_export_into_a_folder_with_someone_elses_readme_refuses_and_keeps_it(exported, capsys):
    tmp_path, _, _ = exported
    other = tmp_path / "repo"
    other.mkdir()
    (other / "README.md").write_text("my project\n")
    assert main(["export", str(tmp_path / "run"), "--out", str(other)]) == 2
    assert "already holds README.md and is not an airlora export" in capsys.readouterr().err
    assert (other / "README.md").read_text() == "my project\n"
    assert sorted(p.name for p in other.iterdir()) == ["README.md"]
    # an earlier export's folder is replaced with --overwrite as before, card included
    before = (tmp_path / "adir" / "README.md").read_text()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "adir"), "--bits", "8",
                 "--overwrite"]) == 0, capsys.readouterr().err
    assert (tmp_path / "adir" / "README.md").read_text() != before


@pytest.mark.parametrize(("source", "expected"), [("hf:imdb", "imdb"), ("hf:glue/sst2", "nyu-mll/glue"),
                                                  ("hf:stanfordnlp/sst2/default", "stanfordnlp/sst2"),
                                                  ("hf:stanfordnlp/sst2", None), ("data/tweets.csv", None)])
def test_the_card_names_a_dataset_only_by_an_id_its_source_says(source, expected):
    from airlora.model_card import hub_dataset_id

    assert hub_dataset_id(source) == expected
