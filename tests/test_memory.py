"""tools/memory.py: its parameter counts are those of the modules it describes, its activation term
behaves (gradient checkpointing and LoRA keep less), and on a real fp32 step the formula is within a
quarter of how much the process's peak memory grows (a fresh process, so that no freed memory is
reused unseen).

Run: python -m pytest -q tests/test_memory.py
"""

import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinyllava import LanguageModel, add_lora  # noqa: E402
from tools import memory  # noqa: E402


@pytest.mark.parametrize("name", sorted(memory.LLMS))
def test_parameter_counts_are_the_modules(name):
    cfg = replace(memory.LLMS[name], num_hidden_layers=1, vocab_size=64)
    lm = LanguageModel(cfg)
    assert memory.lm_params(cfg) == sum(p.numel() for p in lm.parameters())
    adapters = add_lora(lm, r=4, alpha=8)
    assert memory.lora_params(cfg, 4) == sum(p.numel() for p in adapters)


def test_activation_term():
    cfg = replace(memory.LLMS["SmolLM2-135M"], num_hidden_layers=2)
    per_token, _ = memory.layer_activations(cfg, torch.bfloat16)
    assert per_token > 10 * cfg.hidden_size  # a layer keeps many vectors of each token
    kw = dict(cfg=cfg, vision=replace(memory.SIGLIP_B, num_hidden_layers=1), batch=2, positions=256)
    full = memory.step_memory(**kw)["activations"]
    assert memory.step_memory(**kw, checkpointing=True)["activations"] < full
    assert memory.step_memory(**kw, lora_r=8)["adamw"] < memory.step_memory(**kw)["adamw"]


def test_formula_meets_a_real_step():
    r = subprocess.run([sys.executable, "-m", "tools.memory", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    share = re.search(r"during the step \((\d+)%\)", r.stdout)  # the growth as a share of the formula
    assert share and 75 < int(share[1]) < 125, r.stdout
