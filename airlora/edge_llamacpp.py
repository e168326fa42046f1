"""``airlora edge --runtime llama.cpp``: what a device that runs llama.cpp does with a GGUF delivery.

1. Integrity as for every delivery (``edge.verify_delivery``): the GGUF's SHA-256 against the manifest.
2. llama.cpp (through llama-cpp-python, the optional extra ``pip install 'airlora[llamacpp]'``) loads the base
   model's GGUF (``packaged_models.gguf_base``) with the adapter (``lora_path``), as ``llama-cli --lora`` would.
3. Each test example, put in the run's prompt and tokenised by llama.cpp's own tokenizer, is evaluated alone; the
   next-token logits at its last token, at the first token of each label word (found in llama.cpp's vocabulary the
   way ``causal_lm.label_token_ids`` finds them), are its K class logits. Accuracy on the test split, and the largest
   |logit difference| against the cloud model's logits on the record's fixed batch.

llama.cpp computes in its own arithmetic (ggml kernels; Q4_1 base weights dequantised on the fly, activations
possibly quantised to 8 bits for the quantised matrix products), so its logits differ from the cloud's float32
PyTorch ones by more than float rounding: the result reports the difference, it does not hide it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airlora.causal_lm import label_token_ids
from airlora.config import DataConfig, from_dict
from airlora.errors import AirloraError
from airlora.gguf_adapter import GGUF_FILE

N_CTX = 512
"""llama.cpp context: room for one prompt of up to data.max_length tokens."""


class _LlamaTokenizer:
    """llama.cpp's tokenizer behind the two calls ``label_token_ids`` makes of a transformers tokenizer."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.llm.detokenize([i]).decode("utf-8", errors="replace") for i in ids]


def load_llama(base_gguf: Path, adapter: Path, threads: int | None = None) -> Any:
    """llama.cpp with the base GGUF and the LoRA adapter applied (scale 1: the factors carry the scaling)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise AirloraError("--runtime llama.cpp needs llama-cpp-python: pip install 'airlora[llamacpp]' (it builds "
                           "llama.cpp from source)") from None
    try:
        return Llama(model_path=str(base_gguf), lora_path=str(adapter), lora_scale=1.0, n_ctx=N_CTX,
                     logits_all=True, verbose=False, n_threads=threads)
    except (ValueError, RuntimeError) as err:
        raise AirloraError(f"llama.cpp could not load {base_gguf} with the adapter {adapter}: {err}") from None


def label_logits(llm: Any, prompt_ids: list[int], label_ids: list[int]) -> np.ndarray:
    """(K,) next-token logits of the label words' first tokens after ``prompt_ids``, evaluated alone."""
    llm.reset()
    llm.eval(prompt_ids)
    return np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)[label_ids]


def prompt_ids(llm: Any, text: str, max_length: int) -> list[int]:
    """llama.cpp's tokens of ``text``, cut to its last ``max_length`` tokens (the BOS kept) as the cloud's tokenizer
    truncates a causal LM's prompt on the left."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    if len(ids) <= max_length:
        return ids
    bos = ids[:1] if ids[0] == llm.token_bos() else []
    return bos + ids[len(ids) - (max_length - len(bos)):]


def llamacpp_evaluate(adir: str | Path, base: str, data: str | None = None, expected_sha256: str | None = None,
                      threads: int | None = None) -> dict[str, Any]:
    """Verify a GGUF delivery, run it in llama.cpp on the base GGUF, evaluate it; the JSON-ready result."""
    from airlora.data import load_splits
    from airlora.edge import read_record, verify_delivery
    from airlora.packaged_models import gguf_base

    adir = Path(adir)
    manifest = verify_delivery(adir, expected_sha256)
    if manifest.get("adapter_format") != "gguf":
        raise AirloraError(f"--runtime llama.cpp runs a GGUF delivery; {str(adir)!r} holds a "
                           f"{manifest.get('adapter_format', 'adalora')!r} one: export it with --format gguf")
    record = read_record(adir)
    config = from_dict(DataConfig, dict(record["data"], **({"source": data} if data else {})), "data.")
    if config.label_words is None:
        raise AirloraError("--runtime llama.cpp scores label words; the run was a classifier (no data.label_words)")
    llm = load_llama(gguf_base(base), adir / GGUF_FILE, threads)
    labels = label_token_ids(_LlamaTokenizer(llm), config.prompt, config.label_words)

    ref = record["reference"]
    edge = np.stack([label_logits(llm, prompt_ids(llm, s, ref["max_length"]), labels) for s in ref["sentences"]])
    logit_diff = float(np.abs(edge - np.asarray(ref["logits"], dtype=np.float32)).max())
    test = load_splits(config, record["seed"]).test
    predictions = [int(label_logits(llm, prompt_ids(llm, s, config.max_length), labels).argmax())
                   for s in test.sentences]
    test_accuracy = float(np.mean(np.asarray(predictions) == test.labels))
    cloud = record["cloud_test_accuracy"]
    return {
        "runtime": "llama.cpp",
        "test_accuracy": test_accuracy,
        "cloud_test_accuracy": cloud,
        "accuracy_drop": cloud - test_accuracy if data is None else None,
        "max_abs_logit_diff": logit_diff,
        "reference_examples": len(ref["sentences"]),
        "test_examples": len(test),
        "precisions": manifest["precisions"],
        "on_air_bits": record["on_air_bits"],
        "transmitted_params": record["transmitted_params"],
        "sha256": manifest["sha256"][manifest["payload_file"]],
        "checksum_ok": True,
    }
