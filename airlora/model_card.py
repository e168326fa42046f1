"""README.md of an export: a Hugging Face model card for the delivered adapter (``airlora export`` writes it).

The card sits beside adapter_config.json and the payload, as PEFT's ``save_pretrained`` and a hub upload lay a
PEFT adapter out. It is for people and the hub, not for the device: it is not sent, so it is not counted on the
air. Every number comes from the delivery as exported (its manifest and record) and from the run's summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from airlora.bundle import PEFT_PAYLOAD
from airlora.codecs import sent_bits
from airlora.ranks import MODULES, parse_key

CARD_FILE = "README.md"
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
"""The hub id of a packaged base model (RunConfig.model -> id)."""


def hub_dataset_id(source: str) -> str | None:
    """The hub id of an ``hf:`` data source where the source says it (data.py's ``_hub`` tries NAME+CONFIG before
    OWNER/NAME for two parts, so those say it only for GLUE), else None."""
    if not source.startswith("hf:"):
        return None
    parts = source[3:].strip("/").split("/")
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return "/".join(parts[:2])
    return "nyu-mll/glue" if len(parts) == 2 and parts[0] == "glue" else None


def base_model_id(model: str, model_dir: str) -> str:
    """The base model as a hub id when it is known (the packaged one, or a folder saved from the hub), else its
    folder, as PEFT's own cards write ``base_model_name_or_path``."""
    if model in HUB_IDS:
        return HUB_IDS[model]
    config = Path(model_dir) / "config.json"
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path", "")
    except (OSError, json.JSONDecodeError):
        name = ""
    hub_like = isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    return name if hub_like and not Path(name).exists() else model_dir


def _rank_table(ranks: dict[str, int], precisions: dict[str, int], with_bits: bool) -> list[str]:
    """Markdown table, layers × modules: the rank sent, with its bits per value ("4 @ 8") when they differ."""
    layers = 1 + max(parse_key(key)[0] for key in ranks)
    modules = [m for m in MODULES if any(parse_key(key)[1] == m for key in ranks)]
    lines = ["| layer | " + " | ".join(modules) + " |", "|---:|" + "---:|" * len(modules)]
    for layer in range(layers):
        cells = []
        for module in modules:
            key = f"layers.{layer}.{module}"
            rank = ranks.get(key, 0)
            cells.append(f"{rank} @ {precisions[key]}" if with_bits and rank else str(rank))
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines


def model_card(
    config: Any,
    summary: dict[str, Any],
    model_dir: str,
    sent: dict[str, Any],
    record: dict[str, Any],
    export_command: str | None = None,
) -> str:
    """The card's text for an export: ``config`` the run's RunConfig, ``sent`` its delivery.json, ``record`` its
    delivery_record.json."""
    s, ranks, precisions = summary, sent["ranks"], sent["precisions"]
    sizes = ", ".join(f"{split} {n:,}" for split, n in summary["dataset_sizes"].items())
    base = base_model_id(config.model, model_dir)
    edge_base = config.model if config.model in HUB_IDS else model_dir  # what `airlora edge --base` takes
    source = config.data.source
    hub_data = [name] if (name := hub_dataset_id(source)) else []
    used_bits = sent_bits(ranks, precisions)
    sent_modules = sum(1 for r in ranks.values() if r)
    front = [
        "---",
        "library_name: peft",
        *([f"base_model: {json.dumps(base)}"] if base != model_dir else []),  # the hub checks it names a model
        "pipeline_tag: text-classification",
        "tags:",
        *(f"- {tag}" for tag in ("peft", "adalora", "lora", "airlora", "text-classification")),
    ]
    if hub_data:
        front += ["datasets:", *(f"- {name}" for name in hub_data)]
    front.append("---")

    float_payload = sent["payload_file"] == PEFT_PAYLOAD
    num_labels = sent.get("num_labels", 2)
    task = "binary" if num_labels == 2 else f"{num_labels}-class"
    load = [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification",
        "",
        f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={num_labels})',
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
        "```",
    ]
    if config.data.label_words is not None:  # a causal LM scored on label words: no head, the plain causal LM
        load[2:5] = ["from transformers import AutoModelForCausalLM", "",
                     f'base = AutoModelForCausalLM.from_pretrained("{base}")']
        load.insert(-1, f"# class k: the logit of label word k's first token after the prompt {config.data.prompt!r} "
                        f"(words {list(config.data.label_words)})")
    if not float_payload:
        load = [
            f"The payload, `{sent['payload_file']}`, holds integer codes with bf16 scales, which PEFT cannot load "
            f"as is: `airlora edge THIS_FOLDER --base {edge_base}` checks it against `delivery.json`, dequantises it "
            "and attaches it with PEFT."
        ]
    bits_text = "/".join(map(str, used_bits)) or "—"
    accuracy_note = (
        "of this delivery, after its codecs"
        if record["cloud_test_accuracy_is_of_this_delivery"]
        else "of the run's own precisions, not of this export's"
    )
    made = [
        f"- run: `{s['command']}`"
        if s.get("command")
        else "- run: its command was not recorded (started from Python, or by an older airlora); its settings are the "
        "run folder's config.json",
        f"- export: `{export_command}`" if export_command else "- export: `airlora.export.export_adapter` from Python",
    ]
    body = [
        f"# airlora adapter: {s['allocator']} ranks for {base} under a {s['t_max_s']:g} s airtime budget",
        "",
        f"An AdaLoRA adapter (PEFT) with a rank per module, chosen by airlora's `{s['allocator']}` allocator while "
        f"fine-tuning, so that the adapter and its task head can be sent over a {s['fading']} fading link at "
        f"{s['snr_db']:g} dB within T_max = {s['t_max_s']:g} s (AirLLM, arXiv 2507.11515).",
        "",
        "## Use",
        "",
        *load,
        "",
        "## Base model, task and data",
        "",
        f"- base model: `{base}` (trained from the folder `{model_dir}`)",
        f"- task: {task} sentence classification (PEFT task type SEQ_CLS; the head travels in `modules_to_save`)",
        f"- data: {s['dataset']} (`data.source` {source!r}), {sizes}",
        f"- training: {s['steps']} steps, seed {s['seed']}, λ = {s['reward_lambda']:g}, delivered checkpoint of "
        f"step {s['best_step']}",
        "",
        "## Ranks and precisions",
        "",
        f"{sent_modules} of {len(ranks)} modules sent, total rank {sum(ranks.values())} (r_max {s['r_max']}); "
        f"modules at {bits_text} bits per value, the head at {sent['head_bits']}."
        + (" Cells: rank @ bits." if len(used_bits) > 1 else ""),
        "",
        *_rank_table(ranks, precisions, len(used_bits) > 1),
        "",
        "## On the air",
        "",
        f"- {record['transmitted_params']:,} parameters: payload {record['payload_bytes']:,} bytes + scales "
        f"{record['scale_bytes']:,} + header, config and manifest {record['overhead_bytes']:,} (zlib) = "
        f"{record['on_air_bits']:,} bits",
        f"- airtime {record['airtime_s']:.4f} s at {record['snr_db']:g} dB (capacity "
        f"{record['capacity_bps'] / 1e6:.3f} Mbit/s) of T_max {record['t_max_s']:g} s: "
        f"{'fits' if record['fits_t_max'] else 'OVER T_max'}",
        "- this card is not sent and not counted",
        "",
        "## Accuracy",
        "",
        f"- cloud, test split: {record['cloud_test_accuracy']:.4f} ({accuracy_note}); validation "
        f"{s['val_accuracy']:.4f}; majority class {s['majority_baseline_accuracy']:.4f}",
        f"- edge: not measured at export; `airlora edge THIS_FOLDER --base {edge_base} --sha256 "
        f"{sent['sha256'][sent['payload_file']]}` measures it on the device",
        "",
        "## How it was made",
        "",
        *made,
        "",
    ]
    return "\n".join(front + [""] + body)
