"""
A generic training loop, shared by stage 0 (the offline stand-ins), stage 1 (train_pt.py) and
stage 2 (train_sft.py). Nothing in it is about LLaVA: a caller decides *what* is trained (by setting
requires_grad) and hands it a model, a data set, a collate function and a loss; the loop does the
rest:

  AdamW (weight decay on matrices only) · linear warmup then cosine decay · gradient
  accumulation · gradient clipping · bf16 autocast (CUDA by default) · optional torch.compile and
  gradient checkpointing · DDP through torchrun (gloo on CPU) · a tqdm bar (loss, lr, tokens/s) ·
  metrics.jsonl · periodic eval loss · atomic checkpoints and --resume · loss.png at the end.

The loss is normalised by the number of trained tokens in the whole *global* batch (all
micro-batches, all processes), not averaged per micro-batch: so 1 process x 4 micro-batches,
2 processes x 2, and one big batch all compute the same loss and the same gradient (a short answer
counts as much as a long one per token, whatever batch it landed in).
"""

import argparse
import atexit
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

from tinyllava import InputError


@dataclass
class TrainConfig:
    out_dir: str = "runs/out"  # checkpoint.pt, metrics.jsonl and loss.png are written here
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    # other peak lrs by parameter-name prefix, e.g. {"multi_modal_projector.": 2e-5}; same schedule
    part_lrs: dict | None = None
    epochs: float = 1.0  # passes over the training set (fractions allowed)
    # global batch: samples per optimizer step, over all processes and micro-batches
    batch_size: int = 32
    # samples per forward pass in one process; the rest is gradient accumulation
    micro_batch_size: int = 32
    warmup: float = 0.03  # fraction of the steps over which the lr ramps up linearly from 0
    min_lr: float = 0.0  # the cosine decays to this fraction of lr
    weight_decay: float = 0.0  # AdamW decay, applied to matrices only (not to biases or norm gains)
    # AdamW's second-moment decay (LLaVA's); 0.95 adapts faster, for LMs from scratch (nanoGPT)
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    # bf16 autocast; None = on CUDA only (on many CPUs bf16 matmuls are slower than fp32)
    bf16: bool | None = None
    # model.compile() in place (a TinyLlava compiles its vision tower and decoder body)
    compile: bool = False
    # recompute activations in backward (modules with that flag): less memory, more time
    grad_checkpointing: bool = False
    seed: int = 0  # data order (and the caller's initialisation)
    eval_every: int = 0  # steps between eval-loss passes; 0 = only at the end
    save_every: int = 200  # steps between checkpoints (and one at the end)
    resume: bool = False  # continue from out_dir/checkpoint.pt
    # stop after this many steps (the schedule still spans the whole run); 0 = run all
    max_steps: int = 0
    progress: bool = True  # show the tqdm bar
    # DataLoader worker processes that load and collate batches ahead of the loop; None = on CUDA the
    # cores of this process less one (at most 8), on CPU 0 (there the cores are busy computing)
    num_workers: int | None = None


def add_train_args(parser):
    """The TrainConfig fields as --kebab-case flags; a stage sets its defaults with parser.set_defaults."""
    g = parser.add_argument_group("training")
    g.add_argument("--out-dir", help="where checkpoints, metrics.jsonl, loss.png and the result go")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--epochs", type=float, help="passes over the training set")
    g.add_argument("--batch-size", type=int, help="global batch size (samples per optimizer step)")
    g.add_argument("--micro-batch-size", type=int,
                   help="samples per forward pass per process (gradient accumulation)")
    g.add_argument("--warmup", type=float, help="fraction of steps for linear warmup")
    g.add_argument("--min-lr", type=float, help="final lr as a fraction of --lr")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    g.add_argument("--beta2", type=float, help="AdamW second-moment decay")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 = off)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: on CUDA only)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="gradient checkpointing in the LLM")
    g.add_argument("--seed", type=int, help="initialisation and data order (stage 1: of stage 0 too)")
    g.add_argument("--eval-every", type=int,
                   help="steps between eval-loss passes (0 = at the end only)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction,
                   help="continue from OUT_DIR/checkpoint.pt")
    g.add_argument("--max-steps", type=int,
                   help="stop after this many steps (smoke tests); 0 = all")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="show a progress bar")
    g.add_argument("--num-workers", type=int,
                   help="data loading processes (default: on CUDA the cores less one, up to 8; on CPU 0)")
    parser.set_defaults(**asdict(TrainConfig()))


def train_config(args):
    return TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})


# -----------------------------------------------------------------------------
# Processes and devices


def init_distributed():
    """(rank, world_size, device). Under torchrun, joins the process group: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(leave_process_group)
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # OMP_NUM_THREADS is the usual knob (e.g. 1 on a machine busy with other work); without it,
        # two processes on a small CPU must share its cores, not each claim all of them
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


def leave_process_group():
    """Left to the interpreter's shutdown, the process group's worker threads can outlive what they
    hold, and a process whose work is done aborts (SIGABRT) and fails its torchrun: so the group is
    left at exit, while Python is still whole."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main():
    """Whether this is the process that writes files and prints: process 0, or the only one."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    """Wait until every process is here (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def first_process_first(fn):
    """fn() in the first process of each machine, then in the others, which find on disk what it made
    (a data set, a tokenized cache) instead of making it at the same time. Each process passes the
    barrier once, so an error in the first stops the others too, with the same message."""
    if not dist.is_initialized():
        return fn()
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    try:
        result = fn() if first else None
    finally:
        barrier()
    return result if first else fn()


def unwrap(model):
    """The module inside a DDP wrapper (a loss function gets the wrapper: its forward syncs gradients),
    or model itself."""
    return getattr(model, "module", model)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


# -----------------------------------------------------------------------------
# Optimizer, schedule, data order


def make_optimizer(model, lr, weight_decay, beta2, device, part_lrs=None):
    """AdamW over the trainable parameters. Decay only matrices (weights of linear layers,
    embeddings): decaying biases and norm gains towards 0 only hurts, as in nanoGPT and LLaVA. A
    parameter whose name starts with a prefix of part_lrs gets that peak lr (its group's "peak_lr"),
    the others lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InputError("nothing to train: no parameter has requires_grad=True")
    part_lrs = part_lrs or {}

    def peak(name):
        return next((v for prefix, v in part_lrs.items() if name.startswith(prefix)), lr)

    groups = []
    for peak_lr in dict.fromkeys([lr, *part_lrs.values()]):  # each lr once, in order
        for decay in (True, False):
            params = [p for n, p in named if peak(n) == peak_lr and (p.dim() >= 2) == decay]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "peak_lr": peak_lr, "lr": peak_lr})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=device.type == "cuda")


def lr_at(step, total, cfg, peak=None):
    """Linear warmup from 0 to the peak lr (default cfg.lr) over warmup*total steps, then cosine decay
    to min_lr times it (step is 0-based)."""
    peak = cfg.lr if peak is None else peak
    warm = math.ceil(cfg.warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


GROUP_BATCHES = 50  # batches per window sorted by length (epoch_batches)


def epoch_batches(n, batch_size, epoch, seed, lengths=None):
    """The global batches of one epoch: a fresh permutation per epoch, a function of (seed, epoch)
    only, so a resumed run sees exactly the batches the killed one would have. The last partial
    batch is dropped: every step then has the same size, and the schedule does not depend on the
    data's tail.

    With lengths (one per sample), batches hold samples of similar length, so little of a batch is
    padding: the permutation is cut into windows of GROUP_BATCHES batches, each window sorted by
    length and cut into batches, and the batches shuffled (as Hugging Face's group_by_length, which
    LLaVA's sampler builds on). Which samples share a window is still random, so a batch is a random
    draw among samples of its length."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()[: n - n % batch_size]
    if lengths is not None:
        window = GROUP_BATCHES * batch_size
        windows = [perm[k : k + window] for k in range(0, len(perm), window)]
        perm = [i for w in windows for i in sorted(w, key=lambda i: lengths[i])]
    batches = [perm[k : k + batch_size] for k in range(0, len(perm), batch_size)]
    if lengths is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return batches


class StepSampler(torch.utils.data.Sampler):
    """This process's micro-batches (lists of sample indices), step after step from `start` to `stop`,
    in the order of epoch_batches. A DataLoader's workers load them ahead of the loop, and a resumed
    run or a DDP rank loads exactly the samples the loop asks for: the order is the loop's own."""

    def __init__(self, n, cfg, start, stop, rank, world, lengths=None):
        super().__init__()
        self.n, self.cfg, self.start, self.stop, self.rank, self.world = n, cfg, start, stop, rank, world
        self.lengths, self.epoch, self.batches = lengths, None, None
        self.steps_per_epoch = n // cfg.batch_size
        self.per_step = math.ceil(cfg.batch_size // world / cfg.micro_batch_size)  # micro-batches

    def micro_batches(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.batches = epoch_batches(self.n, self.cfg.batch_size, epoch=epoch, seed=self.cfg.seed,
                                         lengths=self.lengths)
            self.epoch = epoch
        mine, mb = self.batches[k][self.rank :: self.world], self.cfg.micro_batch_size
        return [mine[j : j + mb] for j in range(0, len(mine), mb)]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield from self.micro_batches(step)

    def __len__(self):
        return (self.stop - self.start) * self.per_step


def make_loader(dataset, batch_sampler, collate_fn, cfg, device, persistent=False):
    """A DataLoader over `dataset` in `batch_sampler`'s order: pinned memory and prefetching on CUDA. It
    draws nothing from the global RNG (its own generator), so a resumed run stays bit-identical."""
    workers = cfg.num_workers
    if workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(8, max(0, cores // local - 1)) if device.type == "cuda" else 0
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0,
        prefetch_factor=2 if workers else None, generator=torch.Generator())


def next_batch(batches):
    """The next batch of a DataLoader iterator. A bad sample met in a worker is raised as the same
    one-line error as in-process: DataLoader writes the worker's traceback into the message."""
    try:
        return next(batches)
    except InputError as e:
        if not str(e).startswith("Caught "):
            raise
        raise type(e)(str(e).rstrip().splitlines()[-1].split(": ", 1)[-1]) from None


# -----------------------------------------------------------------------------
# The loop. A loss function returns (summed loss, trained targets, positions processed) of a batch;
# the loop divides by the global number of targets.


def train(model, train_set, collate_fn, loss_fn, cfg, eval_set=None, lengths=None, unused=False):
    """Train the parameters of `model` that require grad on `train_set`; returns the metrics logged.

    model is already on its device; collate_fn turns a list of samples into a batch dict; loss_fn is
    (model, batch) -> (summed loss, number of targets, number of positions); lengths, if given, the
    length of each training sample: batches are then grouped by length (see epoch_batches); unused:
    whether a micro-batch may leave a trained parameter without a gradient (DDP must then look for
    such parameters after every backward, or it waits for their gradients and fails)."""
    rank, world, device = init_distributed()
    master = rank == 0
    raw = model  # the module whose parameters we save; `model` may become a DDP wrapper
    for m in raw.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        raw.compile()  # in place: parameter names stay the same (no "_orig_mod." prefix)
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=device_ids,
                                                          find_unused_parameters=unused)
    bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if cfg.batch_size % world:
        raise InputError(f"batch size {cfg.batch_size} is not divisible by {world} processes")
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise InputError(f"{len(train_set)} training samples are fewer than one batch of "
                         f"{cfg.batch_size}")
    total = max(1, round(cfg.epochs * steps_per_epoch))
    trainable = {n: p for n, p in raw.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(raw, cfg.lr, cfg.weight_decay, cfg.beta2, device, cfg.part_lrs)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_file = os.path.join(cfg.out_dir, "checkpoint.pt")
    log_file = os.path.join(cfg.out_dir, "metrics.jsonl")
    run_id = dict(total=total, batch_size=cfg.batch_size, seed=cfg.seed, n=len(train_set),
                  params=sorted(trainable), grouped=lengths is not None,
                  lrs=[g["peak_lr"] for g in optimizer.param_groups])
    start, log = 0, []
    if cfg.resume:
        start, log = resume(ckpt_file, log_file, run_id=run_id, trainable=trainable,
                            optimizer=optimizer, device=device, master=master)
        if world > 1:  # every process must resume from the same step: out_dir on a shared file system
            steps = torch.tensor([start, -start], device=device)
            dist.all_reduce(steps, op=dist.ReduceOp.MAX)
            if steps[0] != -steps[1]:
                raise InputError(f"the processes found different checkpoints in {cfg.out_dir} (steps "
                                 f"{-int(steps[1])} to {int(steps[0])}): is it on a file system all see?")
    if master:
        write_jsonl(log_file, log)

    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    sampler = StepSampler(len(train_set), cfg, start=start, stop=stop, rank=rank, world=world,
                          lengths=lengths)
    batches = iter(make_loader(train_set, sampler, collate_fn, cfg, device))
    eval_loader = None
    if eval_set is not None and len(eval_set):  # each process takes every world-th micro-batch
        mb = cfg.micro_batch_size
        eval_idx = [range(k, min(k + mb, len(eval_set))) for k in range(rank * mb, len(eval_set), world * mb)]
        eval_loader = make_loader(eval_set, eval_idx, collate_fn, cfg, device, persistent=True)

    if master:
        n_params = sum(p.numel() for p in trainable.values())
        others = "".join(f", {prefix}* at {v:g}" for prefix, v in (cfg.part_lrs or {}).items())
        print(f"training {n_params:,} parameters: {total} steps of "
              f"{cfg.batch_size} samples ({steps_per_epoch} steps/epoch), {world} process(es), "
              f"{'bf16' if bf16 else 'fp32'} on {device.type}, peak lr {cfg.lr:g}{others}")
    bar = tqdm(range(start, stop), initial=start, total=total,
               disable=not (master and cfg.progress), dynamic_ncols=True)
    model.train()
    t_start = time.time()
    for step in bar:
        t0 = time.time()
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:  # every part on the same schedule, at its own peak
            group["lr"] = lr_at(step, total, cfg, group["peak_lr"])
        micro = [to_device(next_batch(batches), device) for _ in range(sampler.per_step)]
        waited = time.time() - t0  # for data: ~0 when the workers keep ahead of the loop
        loss, n_tokens = backward(model, micro, loss_fn=loss_fn, autocast=autocast, world=world)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {step + 1} (lr {lr:.2e}); "
                                     "nothing was saved for this step")
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        dt = time.time() - t0
        row = dict(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 4), loss=loss, lr=lr,
                   grad_norm=grad_norm.item(), tok_s=round(n_tokens / dt), data_wait=round(waited / dt, 3),
                   time=round(time.time() - t_start, 2))
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", tok_s=f"{n_tokens / dt:,.0f}")
        eval_now = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == total
        if eval_set is not None and len(eval_set) and eval_now:
            row["eval_loss"] = evaluate(model, raw, eval_loader, loss_fn=loss_fn, autocast=autocast)
            if master:
                bar.write(f"step {step + 1}: eval loss {row['eval_loss']:.4f}")
        log.append(row)
        if master:
            append_jsonl(log_file, row)
        if (step + 1) % cfg.save_every == 0 or step + 1 == total:
            save_checkpoint(ckpt_file, step + 1, run_id, trainable, optimizer)
    bar.close()
    if master and log:
        title = os.path.basename(os.path.normpath(cfg.out_dir))
        plot_losses([(title, log)], os.path.join(cfg.out_dir, "loss.png"))
        last = log[-1]
        print(f"step {last['step']}/{total}: loss {last['loss']:.4f}"
              + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
              + f" ({time.time() - t_start:.1f}s)")
    return log


def backward(model, micro_batches, loss_fn, autocast, world):
    """Forward and backward over this process's micro-batches (on its device) of one step; leaves in
    each .grad the gradient of the global batch's mean loss. Returns (that mean loss, positions)."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # summed loss, targets, positions
    for j, batch in enumerate(micro_batches):
        # DDP averages gradients across processes at every backward: skip it until the last micro-batch
        sync = nullcontext() if world == 1 or j == len(micro_batches) - 1 else model.no_sync()
        with sync:
            with autocast:
                s, n, tokens = loss_fn(model, batch)
            s.backward()
        sums += torch.stack([s.detach().double(), torch.as_tensor(n, device=device).double(),
                             torch.as_tensor(tokens, device=device).double()])
    if world > 1:
        dist.all_reduce(sums)
    loss_sum, n_targets, n_tokens = sums.tolist()
    # the gradients hold d(sum of losses)/dw, averaged over processes by DDP: make them d(mean)/dw
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(world / max(n_targets, 1))
    return loss_sum / max(n_targets, 1), n_tokens


def evaluate(model, raw, loader, loss_fn, autocast):
    """Mean loss per target over the eval loader's batches (this process's share), summed over the
    processes. `model` (maybe DDP) switches modes; the loss runs on `raw`: no gradient sync."""
    device = next(raw.parameters()).device
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    with torch.no_grad(), autocast:
        batches = iter(loader)
        for _ in range(len(loader)):
            s, n, _ = loss_fn(raw, to_device(next_batch(batches), device))
            sums += torch.stack([s.double(), torch.as_tensor(n, device=device).double()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


# -----------------------------------------------------------------------------
# Checkpoints: atomic, and a resumed run continues bit-identically


def save_checkpoint(file, step, run_id, trainable, optimizer):
    """The trained weights, the optimizer and the RNG states after `step` (process 0 writes it)."""
    if is_main():
        cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        rng = {"cpu": torch.get_rng_state(), "cuda": cuda_rng}
        state = dict(step=step, run=run_id, model={n: p.detach() for n, p in trainable.items()},
                     optimizer=optimizer.state_dict(), rng=rng)
        torch.save(state, file + ".tmp")
        os.replace(file + ".tmp", file)  # atomic: a kill mid-write leaves the previous checkpoint
    barrier()


def resume(ckpt_file, log_file, run_id, trainable, optimizer, device, master):
    """(step, metrics so far) from ckpt_file, loaded into the weights and optimizer;
    (0, []) if there is none."""
    if not os.path.exists(ckpt_file):
        if master:
            print(f"--resume: no {ckpt_file} yet, starting from scratch")
        return 0, []
    ckpt = torch.load(ckpt_file, map_location=device, weights_only=False)
    if ckpt["run"] != run_id:
        raise InputError(f"{ckpt_file} belongs to a different run (steps, batch, seed, data size, "
                         "length grouping, trained parameters or peak lrs differ)")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(ckpt["model"][n])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    with open(log_file) as f:  # lines after the checkpoint were logged by the killed run: redo them
        log = [r for r in map(json.loads, f) if r["step"] <= ckpt["step"]]
    if master:
        print(f"resumed {ckpt_file} at step {ckpt['step']}/{run_id['total']}")
    return ckpt["step"], log


# -----------------------------------------------------------------------------
# Metrics and the loss plot


def write_jsonl(file, rows):
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, file)


def append_jsonl(file, row):
    with open(file, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_losses(panels, file, width=640, height=360):
    """Loss curves, one panel per (title, metrics log) side by side, drawn with pillow: the raw training
    loss faint, a smoothed one over it (a centred moving average over ~5% of the steps), the eval
    loss as dots, the learning rate grey against the right axis. The loss axis is logarithmic when the
    smoothed loss spans more than a factor of 20, so the late, small changes stay visible."""
    image = Image.new("RGB", (width * len(panels), height), "white")
    for k, (title, log) in enumerate(panels):
        draw_panel(ImageDraw.Draw(image), log, title, left=k * width, width=width, height=height)
    image.save(file)


def draw_panel(d, log, title, left, width, height):
    ml, mr, mt, mb = 56, 56, 28, 36  # margins: loss ticks left, lr ticks right, title, step ticks
    steps, losses, lrs = [r["step"] for r in log], [r["loss"] for r in log], [r["lr"] for r in log]
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    w, n, sums = max(1, len(log) // 40), len(losses), [0.0]  # smoothed: a centred mean over ~5% of the steps
    for v in losses:
        sums.append(sums[-1] + v)
    windows = [(max(0, i - w), min(n, i + w + 1)) for i in range(n)]
    smooth = [(sums[b] - sums[a]) / (b - a) for a, b in windows]
    values = [v for v in smooth + [e for _, e in evals] if v > 0] or [1.0]  # raw spikes may leave the axis
    lo, hi = min(values), max(values)
    log_scale = hi / lo > 20
    f = math.log10 if log_scale else (lambda v: v)
    flo, fhi = f(lo), f(hi) if hi > lo else f(lo) + 1
    span = max(1, steps[-1] - steps[0])

    def x(step):
        return left + ml + (step - steps[0]) / span * (width - ml - mr)

    def y(v, a=flo, b=fhi):  # a value between a and b, on the axis
        return height - mb - (v - a) / ((b - a) or 1) * (height - mt - mb)

    def y_loss(v):  # raw values beyond the axis are drawn at its edge
        return y(f(min(max(v, lo), hi)))

    d.rectangle((left + ml, mt, left + width - mr, height - mb), outline=(160, 160, 160))
    if log_scale:  # 1, 2 and 5 times the powers of ten in range
        decades = range(math.floor(flo), math.ceil(fhi) + 1)
        ticks = [c * 10.0 ** e for e in decades for c in (1, 2, 5) if lo <= c * 10.0 ** e <= hi]
    else:
        ticks = nice_ticks(lo, hi)
    for t in ticks:
        d.line((left + ml - 4, y_loss(t), left + ml, y_loss(t)), fill="black")
        d.text((left + 4, y_loss(t) - 6), f"{t:.3g}", fill="black")
    for t in nice_ticks(steps[0], steps[-1]):
        d.line((x(t), height - mb, x(t), height - mb + 4), fill="black")
        d.text((x(t) - 10, height - mb + 8), f"{t:g}", fill="black")
    lr_hi = max(lrs) or 1
    for t in (0, lr_hi / 2, lr_hi):
        d.text((left + width - mr + 6, y(t, 0, lr_hi) - 6), f"{t:.0e}", fill=(120, 120, 120))
    if len(steps) > 1:
        lr_points = [(x(st), y(v, 0, lr_hi)) for st, v in zip(steps, lrs)]
        d.line(lr_points, fill=(150, 150, 150), width=1)
        d.line([(x(st), y_loss(v)) for st, v in zip(steps, losses)], fill=(180, 200, 245), width=1)
        d.line([(x(st), y_loss(v)) for st, v in zip(steps, smooth)], fill=(30, 70, 210), width=2)
    for st, v in evals:
        d.ellipse((x(st) - 4, y_loss(v) - 4, x(st) + 4, y_loss(v) + 4), fill=(240, 140, 20))
    last = f", eval {evals[-1][1]:.4f}" if evals else ""
    scale = " · log scale" if log_scale else ""
    d.text((left + ml, 8), f"{title}: loss {smooth[-1]:.4f} (smoothed){last}{scale}", fill="black")


def nice_ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 times a power of ten apart) from lo to hi."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = min((c * 10 ** math.floor(math.log10(raw)) for c in (1, 2, 5, 10)), key=lambda c: abs(c - raw))
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
