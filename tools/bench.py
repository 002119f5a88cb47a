"""
tools/bench.py: tinyllava against transformers' LlavaForConditionalGeneration, on the same weights, with MFU.

    python -m tools.bench              # CPU, realistic shapes, random weights (nothing downloaded)
    python -m tools.bench --quick      # tiny shapes, a few seconds (tests/test_bench.py runs this)
    python -m tools.bench --device cuda --json bench.json
    python -m tools.bench --model DIR  # a LLaVA checkpoint (transformers' layout or ours)
    python -m tools.bench --vision DIR --llm DIR
                                       # a CLIP/SigLIP + a Llama/Qwen2 checkpoint, random projector
    python -m tools.bench --rows decode,train-b8 --dtype fp32
    python -m tools.bench --device cuda --dtype bf16 --rows train-b64 --compile
                                       # any batch size; torch.compile
    python -m tools.bench --device cuda --rows train --profile
                                       # + where tinyllava's time goes: kernels, GPU busy

The default model is a CLIP-B/16-224-shaped vision tower and a SmolLM2-135M-shaped Llama decoder
(GQA, tied embeddings) joined by an mlp2x_gelu projector: transformers builds it with random
weights, and tinyllava loads it from a temporary directory. Before anything is timed, both
implementations must give the same fp32 logits and loss; if they do not, the script stops without
a table.

Rows, each timed after warm-up as the median of repeats that alternate ours / transformers (so that
a busy machine slows both sides alike):
  prefill-bB   one image + 64 text tokens -> the logits of every position
  decode-bB    greedy generation of 128 new tokens with a KV cache (prefill included), no early stop
  train-b8     forward + backward + AdamW step, stage-2 freezing (vision frozen; projector and
               LLM trained), 256 tokens per sample (the image's tokens included), the loss on the
               text tokens; each side as it trains: ours with return_logits=False, transformers'
               with .loss
in fp32 and in bf16 (autocast over fp32 weights, the usual mixed precision). --rows names other
batch sizes too (train-b64); --compile times the training rows with both sides' vision tower and
language model under torch.compile (the first call compiles; inference rows stay eager, decoding
would recompile per length).

MFU = model FLOPs / time / peak FLOP/s. A token costs 2 FLOPs per matmul weight in a forward pass
and 6 in a trained part (forward + backward), plus attention: 4 * layers * width per (query, key)
pair visited, x3 when trained. The frozen vision tower runs forward only, so it counts 2, not 6.
lm_head counts only where its output is needed: every position in prefill, the last one in
generation, the positions with a trained next token in training (transformers computes the logits
of all 256; that work is not credited, and tinyllava's skipping it is not counted as done either).
On CPU the peak is the faster of two large GEMMs timed in this run, one before the rows and one
after (a shared machine's speed drifts, and a peak caught in a slow moment would inflate every
MFU); on GPU it comes from a table of datasheet figures, or "unknown". Decoding one token at a time
is bound by memory, not FLOPs: every step streams all of the LLM's weights. So the decode rows also
get MBU = weight bytes x new tokens / time / read bandwidth, the bandwidth being the faster of two
large tensor reads, timed like the GEMMs.

A square GEMM's peak is more than a model of width 576 can reach: its products are thin. So the
prefill and training rows also report "GEMMs alone", the time that the call's own matrix products
take when each is timed by itself at its shape (matmul_products, matmul_floor; on a GPU as
CUDA-graph replays, so that launching them costs nothing), over tinyllava's time: how much of the
call is inherent matrix work; the rest is what the code around the products costs. MFU / GEMMs
alone is then the MFU that the products alone would reach: the ceiling of any implementation at
these shapes.
"""

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import tinyllava as tl
from tinyllava import InputError, command_line

# dense datasheet peaks in FLOP/s (no sparsity); fp32 means plain FP32, as PyTorch does not use TF32
# by default. The first name found in torch.cuda.get_device_name() wins, so the more specific names
# come first.
GPU_PEAKS = [
    ("H200", {"fp32": 67e12, "bf16": 989e12}),
    ("H100 NVL", {"fp32": 60e12, "bf16": 835e12}),
    ("H100 PCIe", {"fp32": 51e12, "bf16": 756e12}),
    ("H100", {"fp32": 67e12, "bf16": 989e12}),  # SXM
    ("A100", {"fp32": 19.5e12, "bf16": 312e12}),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -----------------------------------------------------------------------------
# The two models, on the same weights


def default_config(quick):
    """A LlavaConfig shaped like CLIP ViT-B/16-224 + SmolLM2-135M (--quick: a toy of the same
    kind)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if quick:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, image_size=32, patch_size=8)
        text = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    else:
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, image_size=224, patch_size=16)
        text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
    text = LlamaConfig(**text, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=text,
        image_token_index=text.vocab_size - 1,  # transformers needs it in the vocabulary
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def load_models(args, tmp):
    """-> (ours, transformers' model), both fp32 on args.device, with identical weights."""
    from transformers import LlavaForConditionalGeneration

    if args.model:
        path = args.model
    elif args.vision or args.llm:  # both: main checks that they come together
        path = os.path.join(tmp, "llava")
        tl.TinyLlava.from_parts(args.vision, args.llm).save_pretrained(path)  # random projector
    else:
        path = os.path.join(tmp, "llava")
        torch.manual_seed(0)
        LlavaForConditionalGeneration(default_config(args.quick)).save_pretrained(path)
    ours = tl.TinyLlava.from_pretrained(path, device=args.device)
    ref = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(args.device)
    vocab = ours.language_model.config.vocab_size
    # our own checkpoints say -200, a value transformers cannot embed
    if not 0 <= ref.config.image_token_id < vocab:
        ref.config.image_token_id = ref.config.image_token_index = vocab - 1
    # no early stop on either side: both must generate exactly the tokens asked for
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ours, ref


def make_batch(ours, ref, batch, n_text, seed=0):
    """Random prompts with one image after 4 text tokens, in both formats: ours with one -200
    placeholder, transformers' with its image token repeated once per image feature."""
    g = torch.Generator().manual_seed(seed)
    vocab, img = ours.language_model.config.vocab_size, ref.config.image_token_id
    text = torch.randint(0, vocab - 1, (batch, n_text), generator=g)
    text += (text >= img).long()  # never the image token itself
    N, cut = ours.vision_tower.num_tokens, min(4, n_text)
    placeholder = torch.full((batch, 1), tl.IMAGE_TOKEN_INDEX)
    ids = torch.cat([text[:, :cut], placeholder, text[:, cut:]], dim=1)
    hf_ids = torch.cat([text[:, :cut], torch.full((batch, N), img), text[:, cut:]], dim=1)
    # labels: every text token is trained, the image is not (transformers and ours both shift them)
    labels = ids.masked_fill(ids == tl.IMAGE_TOKEN_INDEX, tl.IGNORE_INDEX)
    hf_labels = hf_ids.masked_fill(hf_ids == img, tl.IGNORE_INDEX)
    size = ours.vision_tower.config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    dev = ours.language_model.lm_head.weight.device
    to = lambda t: t.to(dev)  # noqa: E731
    return dict(ids=to(ids), hf_ids=to(hf_ids), labels=to(labels), hf_labels=to(hf_labels),
                pixels=to(pixels))


def check_parity(ours, ref, n_text):
    """Same fp32 logits and loss on a 2-sample batch, or stop: a speed comparison of two different
    computations would mean nothing."""
    b = make_batch(ours, ref, 2, n_text, seed=1)
    ours.eval(), ref.eval()
    with torch.no_grad():
        logits, loss = ours(b["ids"], b["pixels"], labels=b["labels"])
        want = ref(input_ids=b["hf_ids"], pixel_values=b["pixels"], labels=b["hf_labels"],
                   use_cache=False)
    diff = (logits - want.logits).abs().max().item()
    scale = max(1.0, want.logits.abs().max().item())
    loss_diff = abs(loss.item() - want.loss.item())
    ok = (logits.shape == want.logits.shape and diff <= 1e-4 * scale
          and loss_diff <= 1e-4 * max(1.0, want.loss.item()))
    return dict(ok=ok, max_logits_diff=diff, max_abs_logit=scale, loss_diff=loss_diff)


# -----------------------------------------------------------------------------
# FLOPs and peaks


def matmul_weights(module):
    # weights that multiply activations: Linear and Conv (patch embedding); embeddings are lookups
    layers = (m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    return sum(m.weight.numel() for m in layers)


def model_flops(model, batch, n_text, new_tokens=0, train=False, logits=None):
    """FLOPs of one prefill (+ new_tokens - 1 cached decode steps), or of a training step's
    forward+backward. logits: the positions of a sample that need lm_head (default all of them): 1
    when generating, the trained targets when training."""
    vt, lm = model.vision_tower, model.language_model
    vc, lc = vt.config, lm.config
    Tv = vc.num_patches + vc.has_cls  # tokens that run through the vision tower (CLS included)
    # attention: every (query, key) pair, as the vision tower is bidirectional
    vision = 2 * matmul_weights(vt) * Tv + 4 * len(vt.encoder.layers) * vc.hidden_size * Tv * Tv
    N = vt.num_tokens
    projector = 2 * matmul_weights(model.multi_modal_projector) * N
    body, head = matmul_weights(lm.model), lm.lm_head.weight.numel()
    d_attn, L = lc.num_attention_heads * lc.head_dim, lc.num_hidden_layers
    T = N + n_text
    attention = 4 * L * d_attn * T * (T + 1) // 2  # causal
    text = 2 * body * T + 2 * head * (T if logits is None else logits) + attention
    if train:  # backward costs twice the forward, for the trained parts only
        return batch * (vision + 3 * (projector + text))
    decode = sum(2 * (body + head) + 4 * L * d_attn * (p + 1) for p in range(T, T + new_tokens - 1))
    return batch * (vision + projector + text + decode)


def gemm_peak(device, dtype, n, repeats=5):
    """Best FLOP/s of an (n, n) @ (n, n) GEMM in the layout nn.Linear uses (x @ W.T)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    w = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: F.linear(a, w), device) for _ in range(repeats + 1))


def matmul_products(model, fn):
    """{(kind, rows, in, out): count} of the matrix products one call of fn makes in model's
    nn.Linear and nn.Conv2d layers: a hook records each forward product x @ W.T and the backward
    ones it will cost, the input's gradient dY @ W if the input needs one and the weight's dY.T @ X
    if the weight is trained."""
    products = collections.Counter()

    def record(m, inputs, out):
        # the patch embedding: one row per patch, a patch's pixels in
        if isinstance(m, nn.Conv2d):
            rows, n = out.numel() // m.out_channels, m.out_channels
            k = m.in_channels * math.prod(m.kernel_size)
        else:
            rows, k, n = inputs[0].numel() // m.in_features, m.in_features, m.out_features
        products["x @ W.T", rows, k, n] += 1
        if torch.is_grad_enabled() and inputs[0].requires_grad:
            products["dY @ W", rows, k, n] += 1
        if torch.is_grad_enabled() and m.weight.requires_grad:
            products["dY.T @ X", rows, k, n] += 1

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    hooks = [m.register_forward_hook(record) for m in layers]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return products


def matmul_floor(products, device, dtype, repeats=3):
    """Seconds that these matrix products take alone, each timed at its own shape and in the layout
    autograd uses: a floor under the call's time, however well the rest of it is written (at widths
    like 576 a GEMM runs far below the square GEMM's peak, so this is the honest yardstick for
    "close to the hardware limit"). Attention's own products are not among them."""
    total = 0.0
    for (kind, rows, k, n), count in products.items():
        shapes = ((rows, k), (n, k), (rows, n))
        x, w, dy = (torch.randn(*shape, device=device, dtype=dtype) for shape in shapes)
        a, b = {"x @ W.T": (x, w.t()), "dY @ W": (dy, w), "dY.T @ X": (dy.t(), x)}[kind]
        out = torch.empty(a.size(0), b.size(1), device=device, dtype=dtype)
        product = lambda: torch.mm(a, b, out=out)  # noqa: E731
        # small products take microseconds: time loops of ~2 ms, so that the syncs around them
        # do not count
        loop = max(1, min(100, int(2e-3 / timed(product, device))))  # this first call also warms up
        run = lambda: [product() for _ in range(loop)]  # noqa: E731
        # launching a small product takes longer than running it: replay a graph of the loop
        if device.type == "cuda":
            # warm up on a side stream first, as torch.cuda.graph's documentation asks
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            run = graph.replay
        total += count * min(timed(run, device) for _ in range(repeats)) / loop
    return total


def read_bandwidth(device, n_bytes, repeats=5):
    """Best bytes/s of reading a large fp32 tensor once (a sum): the roofline of batch-1 decoding,
    which streams every weight from memory for each new token."""
    x = torch.ones(n_bytes // 4, device=device)
    return n_bytes / min(timed(lambda: x.sum(), device) for _ in range(repeats + 1))


def weight_bytes(model):
    """Bytes of the language model's weights (tied matrices once): what a decode step reads."""
    return sum(p.numel() * p.element_size() for p in model.language_model.parameters())


def gpu_peak(dtype_name):
    name = torch.cuda.get_device_name()
    for key, peaks in GPU_PEAKS:
        if key in name:
            return peaks[dtype_name]
    return None  # unknown: better no MFU than a wrong one


# -----------------------------------------------------------------------------
# Timing


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def race(ours_fn, ref_fn, device, warmup, repeats):
    """Median seconds of each side; the order alternates every round so neither side always goes
    first. repeats=None: by the last warm-up round's time, 10 for calls under 0.5 s (GPU rows, where
    a few milliseconds of jitter matter), 3, or 2 for calls over 5 s (keeps the full CPU bench
    within minutes)."""
    for _ in range(warmup):
        t = timed(ours_fn, device) + timed(ref_fn, device)
    if repeats is None:
        repeats = 10 if t < 1 else 3 if t < 10 else 2
    ours_t, ref_t = [], []
    for i in range(repeats):
        first, second = (ours_fn, ref_fn) if i % 2 == 0 else (ref_fn, ours_fn)
        a, b = timed(first, device), timed(second, device)
        ours_t.append(a if i % 2 == 0 else b)
        ref_t.append(b if i % 2 == 0 else a)
    return statistics.median(ours_t), statistics.median(ref_t), repeats


def profile(fn, device, calls=3):
    """Where one call's time goes: torch.profiler over a few calls -> (figures per call, table of
    the top ops). On a GPU the telling pair is kernels per call and their busy time against the
    call's timed time: a step whose kernels keep the GPU busy a fifth of the time waits for Python
    to launch them, not for the GPU."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = prof.key_averages()
    if cuda:
        # the CUDA side: kernels and copies
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        figures = dict(kernels=sum(e.count for e in kernels) / calls,
                       gpu_busy_s=sum(e.self_device_time_total for e in kernels) / calls / 1e6)
    else:
        # aten ops, nested ones included
        figures = dict(ops=sum(e.count for e in events if e.key.startswith("aten::")) / calls)
    table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                         row_limit=15, max_name_column_width=55)
    return figures, table


def autocast(device, dtype_name):
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype_name])


def make_optimizer(params):
    """AdamW, the same settings on both sides; fused (one kernel for all parameters) where PyTorch
    has it."""
    params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


# -----------------------------------------------------------------------------
# The rows


def prefill_row(ours, ref, b, amp):
    ours.eval(), ref.eval()

    def run_ours():
        with torch.no_grad(), amp():
            ours(b["ids"], b["pixels"])

    def run_ref():
        with torch.no_grad(), amp():
            ref(input_ids=b["hf_ids"], pixel_values=b["pixels"], use_cache=False)

    return run_ours, run_ref


def decode_row(ours, ref, b, amp, new_tokens, out):
    ours.eval(), ref.eval()

    def run_ours():
        with amp():
            out["ours"] = ours.generate(b["ids"], b["pixels"], max_new_tokens=new_tokens,
                                        eos_token_id=[])

    def run_ref():
        with amp():
            ids = ref.generate(input_ids=b["hf_ids"], pixel_values=b["pixels"], do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        out["ref"] = ids[:, b["hf_ids"].size(1):]

    return run_ours, run_ref


def compile_parts(ours, ref, mode):
    """torch.compile the vision tower and the decoder on both sides, alike (TinyLlava.compile: our
    decoder's body, transformers' language model). The glue (the image splice, the loss over the
    trained positions) stays eager: its shapes depend on the data. dynamic=False: each batch size
    gets code specialised to its shapes, as a run with a fixed batch would, not the shape-generic
    code a second size would trigger."""
    kw = dict(mode=None if mode == "default" else mode, dynamic=False)
    ours.compile(**kw)
    ref.model.vision_tower.compile(**kw)
    ref.model.language_model.compile(**kw)


def train_row(ours, ref, b, amp):
    # stage 2: the vision tower stays frozen, the projector and the language model learn
    ours.train(), ref.train()
    ours.vision_tower.requires_grad_(False)
    ref.model.vision_tower.requires_grad_(False)
    opt_ours, opt_ref = make_optimizer(ours.parameters()), make_optimizer(ref.parameters())

    def run_ours():
        with amp():
            _, loss = ours(b["ids"], b["pixels"], labels=b["labels"], return_logits=False)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def run_ref():
        with amp():
            loss = ref(input_ids=b["hf_ids"], pixel_values=b["pixels"], labels=b["hf_labels"],
                       use_cache=False).loss
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    return run_ours, run_ref


# the order rows run in: inference first, since training changes the weights
KINDS = ("prefill", "decode", "train")


def plan(rows_arg):
    """(name, kind, batch) for the rows to run. rows_arg: None (the five default rows), or
    comma-separated prefixes of them ("decode" = decode-b1 and decode-b8) and rows of any batch size
    ("train-b64")."""
    rows = [(f"prefill-b{B}", "prefill", B) for B in (1, 8)]
    rows += [(f"decode-b{B}", "decode", B) for B in (1, 8)]
    rows += [("train-b8", "train", 8)]
    if rows_arg:
        picked = set()
        for w in rows_arg.split(","):
            m = re.fullmatch(r"(prefill|decode|train)-b([1-9][0-9]*)", w)
            found = {(w, m[1], int(m[2]))} if m else {r for r in rows if r[0].startswith(w)}
            if not found:
                raise InputError(f"--rows: no row {w!r}; "
                                 "rows are prefill-bN, decode-bN and train-bN")
            picked |= found
        rows = sorted(picked, key=lambda r: (KINDS.index(r[1]), r[2]))
    return rows


def run(args, rows):
    from transformers import __version__ as hf_version
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dev = torch.device(args.device)
    # other work on the machine skews timings
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    quick = args.quick
    n_prompt, new_tokens, train_len = (16, 8, 48) if quick else (64, 128, 256)
    # GPU calls take milliseconds and their first ones pay for kernel selection: warm up more there.
    # Compiling happens in the first call: a second warm-up round then times the compiled code.
    warmup = args.warmup if args.warmup is not None else (3 if dev.type == "cuda" else 1)
    warmup = max(2 if args.compile else 1, warmup)
    repeats = args.repeats if args.repeats is not None else (2 if quick else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    # progress; the table goes to stdout
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    def measure_peaks():
        """A GEMM per dtype on CPU (the same threads the models will use), a datasheet figure on
        GPU; and a read."""
        if dev.type == "cpu":
            sizes = {name: 256 if quick else (2048 if name == "fp32" else 1024) for name in DTYPES}
            peaks = {name: gemm_peak(dev, dt, sizes[name]) for name, dt in DTYPES.items()}
        else:
            peaks = {name: gpu_peak(name) for name in DTYPES}
        # well beyond the caches, except in --quick
        return peaks, read_bandwidth(dev, (16 if quick else 1024) << 20)

    peaks, bandwidth = measure_peaks()
    dtypes = args.dtype.split(",") if args.dtype != "auto" else ["fp32", "bf16"]
    notes = []
    if args.dtype == "auto" and dev.type == "cpu" and not quick and peaks["bf16"] < peaks["fp32"]:
        dtypes = ["fp32"]
        notes.append(f"bf16 rows skipped: this CPU's bf16 GEMM ({peaks['bf16'] / 1e9:.0f} GFLOP/s) "
                     f"is slower than its fp32 one ({peaks['fp32'] / 1e9:.0f} GFLOP/s), "
                     "no native bf16 units; --dtype bf16 runs them anyway")

    with tempfile.TemporaryDirectory() as tmp:
        say("building the models ...")
        t0 = time.time()
        ours, ref = load_models(args, tmp)
        say(f"  done in {time.time() - t0:.0f}s")
    parity = check_parity(ours, ref, n_prompt)
    say(f"parity (fp32): max |logits diff| {parity['max_logits_diff']:.2e} "
        f"(max |logit| {parity['max_abs_logit']:.2f}), loss diff {parity['loss_diff']:.2e}")
    if not parity["ok"]:
        raise SystemExit("tinyllava and transformers disagree on the same weights: "
                         "refusing to time them")

    results, compiled = [], False
    for name, kind, B in rows:
        for dtype_name in dtypes:
            amp = lambda: autocast(dev, dtype_name)  # noqa: E731
            n_text = train_len - ours.vision_tower.num_tokens if kind == "train" else n_prompt
            n_text = max(n_text, 8)
            b = make_batch(ours, ref, B, n_text)
            T = ours.vision_tower.num_tokens + n_text  # sequence length the language model sees
            say(f"timing {name} {dtype_name} (batch {B}, {T} tokens) ...")
            gen = {}
            if kind == "prefill":
                fns, tokens = prefill_row(ours, ref, b, amp), B * T
                flops = model_flops(ours, B, n_text)
            elif kind == "decode":
                fns, tokens = decode_row(ours, ref, b, amp, new_tokens, gen), B * new_tokens
                flops = model_flops(ours, B, n_text, new_tokens=new_tokens, logits=1)
            else:
                # the training rows only: decoding would recompile for every length
                if args.compile and not compiled:
                    compile_parts(ours, ref, args.compile)
                    compiled = True
                fns, tokens = train_row(ours, ref, b, amp), B * T
                # per sample: every text token but the first
                targets = int((b["labels"][:, 1:] != tl.IGNORE_INDEX).sum()) // B
                flops = model_flops(ours, B, n_text, train=True, logits=targets)
            # its matrix products, counted by hooks with compiled code set aside (see below)
            if kind != "decode":
                with torch.compiler.set_stance("force_eager"):
                    products = matmul_products(ours, fns[0])
            t_ours, t_ref, n = race(*fns, dev, warmup, repeats)
            if args.profile:
                figures, table = profile(fns[0], dev)
                summary = describe_profile(figures, t_ours)
                print(f"\ntinyllava, {name} {dtype_name}: {summary}\n{table}")
            row = dict(row=name, dtype=dtype_name, batch=B, seq_len=T, tokens=tokens, flops=flops,
                       repeats=n, ours_s=t_ours, transformers_s=t_ref, ratio=t_ref / t_ours,
                       ours_tokens_per_s=tokens / t_ours, transformers_tokens_per_s=tokens / t_ref)
            if kind == "decode":
                if gen["ours"].shape != gen["ref"].shape:
                    raise RuntimeError(f"decode generated {tuple(gen['ours'].shape)} "
                                       f"vs {tuple(gen['ref'].shape)} tokens")
                same = gen["ours"] == gen["ref"].to(gen["ours"].device)
                row["same_tokens"] = same.float().mean().item()
                # memory-bandwidth utilisation: the weights each forward pass streams (prefill
                # included, so a lower bound)
                row["streamed_bytes"] = new_tokens * weight_bytes(ours)
            # decoding is bound by memory, not by its matrix products: its yardstick is MBU. The
            # products were counted before timing, in eager mode: a compiled model runs the same
            # ones, but hooks in it would make it recompile.
            if kind != "decode":
                row["matmul_floor_s"] = matmul_floor(products, dev, DTYPES[dtype_name])
            if kind == "train":
                ours.eval(), ref.eval()
            if args.profile:
                row["profile_ours"] = figures
            results.append(row)
            say(f"  ours {speed(row, 'ours')}, transformers {speed(row, 'transformers')}: "
                f"ratio {row['ratio']:.2f}")

    # a shared machine's speed drifts: the peak is the best of a measurement before the rows and one
    # after them
    if dev.type == "cpu":
        again, bandwidth_again = measure_peaks()
        peaks = {k: max(v, again[k]) for k, v in peaks.items()}
        bandwidth = max(bandwidth, bandwidth_again)
    for row in results:
        peak = peaks[row["dtype"]]
        for side in ("ours", "transformers"):
            row[f"mfu_{side}"] = row["flops"] / row[f"{side}_s"] / peak if peak else None
            if "streamed_bytes" in row:
                row[f"mbu_{side}"] = row["streamed_bytes"] / row[f"{side}_s"] / bandwidth

    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = f"{cpu_name()} ({torch.get_num_threads()} CPU threads)"
    report = dict(
        device=device_name, torch=torch.__version__, transformers=hf_version,
        python=platform.python_version(), load_average_at_start=load_at_start, model=describe(ours),
        quick=quick, warmup=warmup, repeats=repeats, parity=parity,
        compile=args.compile,
        peak_flops={k: v for k, v in peaks.items()},
        peak_source="measured GEMM" if dev.type == "cpu" else "datasheet",
        read_bandwidth=bandwidth,
        notes=notes, rows=results,
    )
    print(render(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


# -----------------------------------------------------------------------------
# Report


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def describe(model):
    vc, lc = model.vision_tower.config, model.language_model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"{vc.model_type} {vc.hidden_size}x{len(model.vision_tower.encoder.layers)} layers "
            f"({model.vision_tower.num_tokens} image tokens) "
            f"+ {model.multi_modal_projector.kind} "
            f"+ {lc.model_type} {lc.hidden_size}x{lc.num_hidden_layers} layers "
            f"({lc.num_attention_heads}/{lc.num_key_value_heads} heads, vocab {lc.vocab_size}"
            f"{', tied' if lc.tie_word_embeddings else ''}): {n / 1e6:.1f}M parameters")


def speed(row, side):
    t = row[f"{side}_s"]
    if row["row"].startswith("decode"):
        return f"{row['tokens'] / t:.1f} tok/s"
    return f"{t * 1e3:.0f} ms" if t < 10 else f"{t:.1f} s"


def describe_profile(f, seconds):
    """The profile's figures per call, against the call's timed (unprofiled) seconds."""
    if "kernels" in f:
        return (f"{f['kernels']:,.0f} kernels, {f['gpu_busy_s'] * 1e3:.1f} ms of GPU work per call "
                f"timed at {seconds * 1e3:.1f} ms "
                f"(the GPU busy {100 * f['gpu_busy_s'] / seconds:.0f}% of it)")
    return (f"{f['ops']:,.0f} aten ops per call (nested ones included), "
            f"timed at {seconds * 1e3:.1f} ms")


def pct(x):
    return "unknown" if x is None else f"{100 * x:.1f}%"


def format_row(r):
    floor = pct(r["matmul_floor_s"] / r["ours_s"]) if "matmul_floor_s" in r else "-"
    return (f"{r['row']:<11} {r['dtype']:<5} {speed(r, 'ours'):>12} {speed(r, 'transformers'):>13}"
            f" {r['ratio']:>6.2f} {pct(r['mfu_ours']):>9} {pct(r['mfu_transformers']):>9}"
            f" {floor:>11}")


def render(rep):
    peaks = ", ".join(f"{k} {'unknown' if v is None else f'{v / 1e9:,.0f} GFLOP/s'}"
                      for k, v in rep["peak_flops"].items())
    p = rep["parity"]
    compiled = ("training rows: vision towers and decoders under torch.compile "
                f"(mode {rep['compile']})")
    repeats = rep["repeats"] or "10 (3 for calls over 0.5 s, 2 over 5 s)"
    lines = [
        f"tinyllava vs transformers {rep['transformers']} | torch {rep['torch']} | {rep['device']}",
        f"model: {rep['model']}",
        f"parity (fp32): max |logits diff| {p['max_logits_diff']:.1e}, "
        f"loss diff {p['loss_diff']:.1e}",
        f"peak ({rep['peak_source']}): {peaks}",
        *([compiled] if rep["compile"] else []),
        f"medians of {repeats} timed runs per side after {rep['warmup']} warm-up; "
        "ratio = transformers time / ours (> 1: tinyllava faster)",
        "GEMMs alone: the time of the call's matrix products, each timed alone at its shape, "
        "over tinyllava's time",
        "",
        f"{'row':<11} {'dtype':<5} {'tinyllava':>12} {'transformers':>13} {'ratio':>6} "
        f"{'MFU ours':>9} {'MFU hf':>9} {'GEMMs alone':>11}",
    ]
    lines += [format_row(r) for r in rep["rows"]]
    mbu = [r for r in rep["rows"] if "mbu_ours" in r]
    if mbu:
        lines += ["", f"decode vs memory bandwidth (a {rep['read_bandwidth'] / 1e9:.1f} GB/s read, "
                  "measured): the fp32 weights streamed per token / time / bandwidth, "
                  "prefill included"]
        lines += [f"{r['row']:<11} {r['dtype']:<5} MBU ours {pct(r['mbu_ours'])}, "
                  f"transformers {pct(r['mbu_transformers'])}" for r in mbu]
    lines += [f"note: {n}" for n in rep["notes"]]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a LLaVA checkpoint directory (transformers' or tinyllava's)")
    ap.add_argument("--vision", help="a CLIP / SigLIP checkpoint directory (with --llm)")
    ap.add_argument("--llm", help="a Llama / Qwen2 checkpoint directory (with --vision)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="auto",
                    help="fp32, bf16 or fp32,bf16; auto = both, but bf16 only where it is fast")
    ap.add_argument("--rows",
                    help="comma-separated row names or prefixes, e.g. decode,train-b8 "
                         "(default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes and few repeats: a smoke test, not a measurement")
    ap.add_argument("--warmup", type=int,
                    help="untimed runs per side before timing "
                         "(default 1 on CPU, 3 on GPU; at least 1)")
    ap.add_argument("--repeats", type=int,
                    help="timed runs per side, the median is reported "
                         "(default 10, 3 for calls over 0.5 s, 2 over 5 s; --quick 2)")
    ap.add_argument("--threads", type=int,
                    help="CPU threads (default: PyTorch's choice); "
                         "1 is steadier on a shared machine")
    ap.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                    help="torch.compile both sides' vision tower and decoder for the training rows "
                         "(MODE: default, reduce-overhead, max-autotune; the first call compiles, "
                         "so warm-up is at least 2)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing each row, profile tinyllava's call: kernels (ops on CPU), "
                         "GPU busy time, top ops")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    # a user's mistake stops here, not after minutes of measuring peaks and building models
    if args.quick and args.model or args.quick and args.vision:
        raise InputError("--quick builds its own tiny model")
    if not args.model and bool(args.vision) != bool(args.llm):  # --model wins over the pair
        raise InputError("--vision and --llm go together")
    used = {"--model": args.model} if args.model else {"--vision": args.vision, "--llm": args.llm}
    for flag, path in used.items():
        if path and not os.path.isdir(path):
            raise InputError(f"{flag} {path!r}: no such directory")
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"{flag} {path!r}: not a checkpoint directory (no config.json)")
    for d in args.dtype.split(","):
        if args.dtype != "auto" and d not in DTYPES:
            raise InputError(f"--dtype: unknown {d!r}; choose from fp32, bf16")
    run(args, plan(args.rows))


if __name__ == "__main__":
    command_line(main)
