"""`unparrot train`: CLIP training on shards (open_clip models, open_clip's loss), CPU or GPU, 1..N processes.

Equal compute for every subset: training runs for a fixed number of samples seen, drawing shards with
replacement. LaCLIP text sampling and text-mask augmentation happen in the data pipeline (data.py).
Checkpoints are open_clip's format ({"name", "epoch", "state_dict", "optimizer"} plus unparrot's step,
samples seen, config and, for dense-vocabulary models, the vocabulary), so
`open_clip.create_model_and_transforms(name, pretrained=checkpoint)` loads them.

Multi-process: launched by `torchrun --nproc_per_node N -m unparrot train ...` (or `unparrot train --nproc N`),
DistributedDataParallel over gloo (CPU) or nccl (GPU); the loss is open_clip's ClipLoss with features
gathered with gradients, so N processes with the global batch B train exactly like one process with B
(for models without BatchNorm; BatchNorm statistics are per process, as in open_clip, unless
`sync_bn` on a GPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..flags import option
from ..pool import atomic_write_bytes, remove_stale_temp


# old option names that configs (YAML files, run folders) may still use
RENAMED = {"workers": "loader_workers"}


@dataclass
class TrainConfig:
    """Everything that defines a run; validated before any work (`validate`)."""

    # pool/reshard folder, folder of tars, glob or {a..b} pattern
    train_data: str | list = option("", "")
    # run folder: checkpoints/, metrics.jsonl, tensorboard/
    out: str = option("runs/run", "run folder (checkpoints/, metrics.jsonl, tensorboard/, summary.json)")
    model: str = option("unparrot-rn-tiny-v1k", "open_clip architecture or an unparrot config "
        "(unparrot-rn-tiny[-v1k], unparrot-vit-tiny)")
    pretrained: str | None = option(None, "initial weights: checkpoint file or open_clip tag")
    # samples seen in the whole run
    samples: int = option(115_200, "samples seen in the whole run (steps = samples // batch_size)")
    # global batch (all processes)
    batch_size: int = option(64, "global batch over all processes")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.1, "AdamW weight decay (not on biases, norms, embeddings, logit scale)")
    # < 1: share of the steps; >= 1: steps
    warmup: float = option(0.05, "warmup: a share of the steps (< 1) or a number of steps")
    betas: tuple = option((0.9, 0.98), "AdamW betas")
    eps: float = option(1e-6, "AdamW eps")
    grad_clip: float | None = option(1.0, "gradient norm clipping (empty: off)")
    # gradient accumulation micro-steps per optimizer step
    accum: int = option(1, "gradient accumulation micro-batches per step (exact for the contrastive loss)")
    # e.g. 33.3 (temperature 0.03); None keeps open_clip's 1/0.07
    init_logit_scale: float | None = option(None, "initial logit scale, e.g. 33.3 (temperature 0.03); default "
        "open_clip's 1/0.07")
    seed: int = option(0, "seed of the model init and the data order")
    # data loader processes per training process (not `workers`: that is the engines' operator copies;
    # the old name still reads, as a flag and in configs)
    loader_workers: int = option(1, "data loader processes per training process", aliases=("--workers",))
    shuffle_buffer: int = option(1000, "samples in the shuffle buffer")
    # global (layout-independent) or sharded (scalable)
    data_order: str = option("global", "global (same batches for any process layout) or sharded (scalable)")
    # RandomResizedCrop scale (LaCLIP); None: no augmentation
    rrc_scale: tuple | None = option((0.5, 1.0), "RandomResizedCrop scale range (LaCLIP: [0.5, 1.0]); null: no "
        "augmentation")
    # LaCLIP: sample among the caption and its rewrites
    rewrites: bool = option(False, "LaCLIP: sample the caption among the original and its rewrites (.json 'rewrites')")
    # weight of the original caption among the rewrites
    original_weight: float = option(1.0, "relative weight of the original caption among the rewrites")
    # weights of rewrites 1, 2, ... (default 1 each; missing ones 1)
    rewrite_weights: list | None = option(None, "weights of rewrite 1, 2, ... (YAML list, e.g. [1, 1, 0.5, 0.5]; "
        "default 1 each)")
    # probability of filling the text boxes (needs "boxes" in .json)
    mask_text_prob: float = option(0.0, "probability of filling the text boxes (.json 'boxes', from reshard --columns "
        "boxes)")
    # extra texts/files for a dense vocabulary (eval prompts)
    vocab_texts: list = field(default_factory=list, metadata={"help": "extra texts or text files for a dense "
        "vocabulary (-v1k models): evaluation prompts, "
        "class names"})
    # auto (fp32 on CPU, amp bf16 on GPU), fp32, bf16, amp
    precision: str = option("auto", "auto (fp32 on CPU, bf16 autocast on GPU), fp32, bf16, amp")
    device: str = option("auto", "auto, cpu, cuda")
    # torch threads per process (default: cores / processes)
    threads: int | None = option(None, "torch threads per process (default cores / processes)")
    # steps; 0: only at the end
    checkpoint_every: int = option(0, "save every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "step checkpoints kept")
    log_every: int = option(10, "progress/TensorBoard interval in steps (metrics.jsonl has every step)")
    # stop early (schedule unchanged): budgets, preemption tests
    stop_at_step: int | None = option(None, "stop at this step with the schedule of the full run")
    # a checkpoint path, or "latest"
    resume: str | None = option(None, "checkpoint path or 'latest' (exact continuation)")
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs")
    # at the end, RUN/open_clip/: a folder open_clip's own loaders read
    export_open_clip: bool = option(True, "write RUN/open_clip/ at the end (open_clip_config.json + weights; "
        "open_clip, open_clip_train and CLIP_benchmark load it as "
        "local-dir:RUN/open_clip)")
    progress: bool = option(True, "")

    def validate(self) -> "TrainConfig":
        errs = []
        if not self.train_data:
            errs.append("train_data is required")
        if self.samples < self.batch_size:
            errs.append(f"samples ({self.samples}) must be at least one batch ({self.batch_size})")
        for name in ("batch_size", "accum", "log_every"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be >= 1")
        if self.batch_size % self.accum:
            errs.append(f"batch_size ({self.batch_size}) must divide by accum ({self.accum})")
        weights = [self.original_weight, *(self.rewrite_weights or [])]
        if any(not isinstance(w, (int, float)) or w < 0 for w in weights):
            errs.append("original_weight and rewrite_weights must be non-negative numbers")
        if self.lr <= 0 or self.weight_decay < 0:
            errs.append("lr must be > 0 and weight_decay >= 0")
        if not 0 <= self.mask_text_prob <= 1:
            errs.append("mask_text_prob must be in [0, 1]")
        if self.data_order not in ("global", "sharded"):
            errs.append("data_order is global or sharded")
        if self.precision not in ("auto", "fp32", "bf16", "amp"):
            errs.append("precision is auto, fp32, bf16 or amp")
        if self.rrc_scale is not None and not (0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1):
            errs.append("rrc_scale must be (low, high) within (0, 1]")
        if errs:
            raise ValueError("bad training config: " + "; ".join(errs))
        return self

    @property
    def steps(self) -> int:
        return self.samples // self.batch_size

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {RENAMED.get(k, k): v for k, v in d.items()}
        bad = set(d) - names
        if bad:
            raise TypeError(f"unknown training options {sorted(bad)}")
        d = {k: tuple(v) if isinstance(v, list) and k in ("betas", "rrc_scale") else v for k, v in d.items()}
        return cls(**d)


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def param_groups(model, weight_decay: float):
    """AdamW groups: no weight decay on biases, norms, embeddings and the logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (
            p.ndim < 2 or "bn" in n or "ln" in n or "norm" in n or "bias" in n or "logit_scale" in n or "embedding" in n
        )
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, base: float, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine to zero (open_clip's schedule)."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def build_vocab_for(cfg: TrainConfig, shards) -> list[int]:
    """A dense vocabulary from every caption and rewrite in the training shards plus `vocab_texts`."""
    from ..io.samples import parse_sample
    from ..io.tar import RawSample, iter_samples
    from ..models import build_vocab

    texts = []
    for p in shards:
        for item in iter_samples(p):
            if isinstance(item, RawSample) and not item.problem:
                row = parse_sample(item, "")
                if row["caption"]:
                    texts.append(row["caption"])
                texts.extend(r for r in (row["meta"] or {}).get("rewrites") or [] if isinstance(r, str))
    for t in cfg.vocab_texts:
        if isinstance(t, str) and os.path.isfile(t):
            texts.extend(Path(t).read_text().splitlines())
        else:
            texts.append(str(t))
    return build_vocab(sorted(set(texts)))


def _latest_checkpoint(out: Path) -> Path | None:
    p = out / "checkpoints" / "latest.pt"
    return p if p.exists() else None


def train(cfg: TrainConfig | dict) -> dict:
    """Train; returns a summary dict (final loss, steps, samples seen, checkpoint path, samples/s, ...)."""
    import torch

    from ..models import load_clip, model_config
    from .data import SampleMaker, TrainStream, resolve_shards

    cfg = (TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg).validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank, world, local_rank = _dist_env()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    out = Path(cfg.out)
    shards = resolve_shards(cfg.train_data)
    mcfg = model_config(cfg.model)
    dense = mcfg.get("text_cfg", {}).get("vocab_size", 49408) < 49408

    resume_path = None
    if cfg.resume:
        resume_path = _latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if cfg.resume != "latest" and not resume_path.exists():
            raise FileNotFoundError(f"resume checkpoint {cfg.resume} not found")
    ckpt = torch.load(resume_path, map_location="cpu", weights_only=True) if resume_path else None

    vocab = None
    if dense:
        vocab = list(ckpt["unparrot_vocab"]) if ckpt and "unparrot_vocab" in ckpt else build_vocab_for(cfg, shards)
    torch.manual_seed(cfg.seed)
    clip = load_clip(cfg.model, cfg.pretrained, device=device, vocab=vocab, train=True)
    model = clip.model
    if cfg.init_logit_scale and not cfg.pretrained:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step = int(ckpt["step"])
        if ckpt.get("config", {}).get("samples") not in (None, cfg.samples):
            raise ValueError(f"resume: the checkpoint's run has samples={ckpt['config']['samples']}, not {cfg.samples}")
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)

    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)
    steps = cfg.steps
    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)
    stop = min(steps, cfg.stop_at_step) if cfg.stop_at_step else steps
    if rank == 0:  # temp files of a killed run (its summary's; checkpoint temps are rewritten in place)
        remove_stale_temp(out)
    if start_step >= stop:  # a finished run resumed: nothing to do, nothing rewritten
        return _finished_summary(out, cfg, resume_path, start_step, steps, world, rank == 0)
    precision = cfg.precision if cfg.precision != "auto" else ("amp" if device.startswith("cuda") else "fp32")
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if precision in ("amp", "bf16") and device.startswith("cuda")
        else torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else None
    )

    maker = SampleMaker(
        clip.image_size,
        clip.tokenizer,
        seed=cfg.seed,
        rrc_scale=cfg.rrc_scale,
        use_rewrites=cfg.rewrites,
        original_weight=cfg.original_weight,
        rewrite_weights=tuple(cfg.rewrite_weights or ()),
        mask_text_prob=cfg.mask_text_prob,
    )
    stream = TrainStream(
        shards, maker, cfg.batch_size, stop, start_step, rank, world, cfg.seed, cfg.shuffle_buffer, cfg.data_order
    )
    import torch.utils.data as tud

    loader = tud.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.loader_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.loader_workers else None,
        multiprocessing_context="spawn" if cfg.loader_workers else None,
    )

    is_main = rank == 0
    writer = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            writer = None
    from ..progress import progress_bar

    bar = progress_bar(
        total=stop, initial=start_step, desc=f"train {out.name}", unit="step", disable=not (is_main and cfg.progress)
    )
    metrics_path = out / "metrics.jsonl"
    if is_main and metrics_path.exists():  # a resumed run rewrites what came after its checkpoint
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    t_start = time.perf_counter()
    wait_total = step_total = 0.0
    last = {"loss": float("nan")}
    micro = cfg.batch_size // cfg.accum // world
    t_prev = time.perf_counter()
    step = start_step
    for step, images, texts in _plain_worker_errors(loader):
        t_got = time.perf_counter()
        wait = t_got - t_prev
        lr = lr_at(step, cfg.lr, warmup, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        ddp_model.train()
        opt.zero_grad(set_to_none=True)
        images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
        total = 0.0
        if cfg.accum == 1:
            total = _forward_backward(ddp_model, loss_fn, images, texts, autocast)
        else:
            # exact accumulation for a contrastive loss: features of the whole batch first (no grad),
            # then each chunk recomputed with grad against the cached features of the others
            total = _accumulated(ddp_model, model, loss_fn, images, texts, micro, autocast)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        t_done = time.perf_counter()
        wait_total += wait
        step_total += t_done - t_prev
        t_prev = t_done
        done = step + 1
        last = {
            "step": done,
            "loss": total,
            "lr": lr,
            "logit_scale": float(model.logit_scale.detach().exp()),
            "step_seconds": t_done - (t_got - wait),
            "wait_seconds": wait,
            "samples_seen": done * cfg.batch_size,
            "data_wait": wait_total / max(step_total, 1e-9),
            "samples_per_s": (done - start_step) * cfg.batch_size / max(t_done - t_start, 1e-9),
            "skipped_samples": stream.skipped,
        }
        if is_main:
            bar.update(1)
            if done % cfg.log_every == 0 or done == stop:
                bar.set_postfix(loss=f"{total:.3f}", sps=f"{last['samples_per_s']:.0f}")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            if writer is not None and (done % cfg.log_every == 0 or done == stop):
                for k in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait"):
                    writer.add_scalar(f"train/{k}", last[k], done)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < stop:
                save_checkpoint(out, model, opt, cfg, done, vocab)
        if done >= stop:
            break
    bar.close()
    path = exported = None
    if is_main:
        path = save_checkpoint(out, model, opt, cfg, max(step + 1, start_step), vocab, final=stop == steps)
        if cfg.export_open_clip and stop == steps:
            from ..models import export_open_clip

            exported = str(export_open_clip(path, out / "open_clip"))
        if writer is not None:
            writer.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    summary = {
        **last,
        "steps": stop,
        "planned_steps": steps,
        "checkpoint": str(path) if path else None,
        "open_clip": exported,
        "seconds": time.perf_counter() - t_start,
        "world_size": world,
        "model": cfg.model,
    }
    if is_main:
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _plain_worker_errors(loader):
    """Iterate `loader`; a data worker's error is re-raised with its own one-line message. (DataLoader puts
    the worker's whole traceback into the message it re-raises, which a command line cannot show as one
    line; the chained exception keeps it for UNPARROT_DEBUG=1.)"""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            text = str(e)
            if "Original Traceback" not in text:
                raise
            last = text.rstrip().splitlines()[-1]
            msg = f"in a data worker: {last.split(': ', 1)[1] if ': ' in last else last}"
            try:
                err = type(e)(msg)
            except Exception:  # noqa: BLE001 - an exception type that wants other arguments
                err = RuntimeError(msg)
            raise err from e
        yield item


def _finished_summary(out: Path, cfg: TrainConfig, resume_path, step: int, steps: int, world: int, is_main: bool):
    """The summary of a run that already reached `step`: its summary.json, or (killed between the final
    checkpoint and summary.json) one rebuilt from its metrics and written. Checkpoints and metrics are
    left as they are, so resuming a finished run any number of times changes nothing."""
    p = out / "summary.json"
    if p.exists():
        summary = json.loads(p.read_text())
        if summary.get("steps") == step:
            return summary
    last = {"loss": float("nan")}
    metrics = out / "metrics.jsonl"
    for ln in metrics.read_text().splitlines() if metrics.exists() else []:
        if ln and json.loads(ln).get("step") == step:
            last = json.loads(ln)
    d = out / "checkpoints"
    path = d / ("final.pt" if step >= steps else f"step_{step:07d}.pt")
    summary = {
        **last,
        "steps": step,
        "planned_steps": steps,
        "checkpoint": str(path if path.exists() else resume_path),
        "seconds": 0.0,
        "world_size": world,
        "model": cfg.model,
    }
    if is_main:
        atomic_write_bytes(p, json.dumps(summary, indent=1).encode())
    return summary


def _forward_backward(ddp_model, loss_fn, images, texts, autocast) -> float:
    import contextlib

    with autocast or contextlib.nullcontext():
        fi, ft, scale = ddp_model(images, texts)[:3]
        loss = loss_fn(fi.float(), ft.float(), scale.float())
    loss.backward()
    return float(loss.detach())


def _accumulated(ddp_model, model, loss_fn, images, texts, micro, autocast) -> float:
    """Gradient accumulation that is exact for the contrastive loss (GradCache-style).

    Exact for models without batch statistics (ViT towers); BatchNorm towers (ModifiedResNet) see
    micro-batch statistics, as in any accumulation."""
    import contextlib

    import torch

    ctx = autocast or contextlib.nullcontext()
    with torch.no_grad(), ctx:
        feats = [ddp_model(images[i : i + micro], texts[i : i + micro])[:2] for i in range(0, len(images), micro)]
    all_i = torch.cat([f[0].float() for f in feats])
    all_t = torch.cat([f[1].float() for f in feats])
    total = None
    for i in range(0, len(images), micro):
        with ctx:
            fi, ft, scale = ddp_model(images[i : i + micro], texts[i : i + micro])[:3]
        ai = torch.cat([all_i[:i], fi.float(), all_i[i + micro :]])
        at = torch.cat([all_t[:i], ft.float(), all_t[i + micro :]])
        # the whole batch's loss; the logit scale's gradient is complete in the first micro-batch alone
        loss = loss_fn(ai, at, (scale if i == 0 else scale.detach()).float())
        loss.backward()
        total = float(loss.detach())
    return total


def save_checkpoint(out: Path, model, opt, cfg: TrainConfig, step: int, vocab, final: bool = False) -> Path:
    """open_clip's checkpoint dict (+ unparrot's fields), written atomically; keeps the newest few."""
    import torch

    ck = {
        "name": cfg.model,
        "epoch": step,
        "step": step,
        "samples_seen": step * cfg.batch_size,
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    if vocab is not None:
        ck["unparrot_vocab"] = list(vocab)
    d = out / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    path = d / ("final.pt" if final else f"step_{step:07d}.pt")
    tmp = d / (path.name + ".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)
    latest_tmp = d / "latest.pt.tmp"  # a hard link: `--resume latest` without a second copy
    if latest_tmp.exists():
        latest_tmp.unlink()
    os.link(path, latest_tmp)
    os.replace(latest_tmp, d / "latest.pt")
    olds = sorted(d.glob("step_*.pt"))
    for p in olds[: -cfg.keep_checkpoints] if cfg.keep_checkpoints else []:
        p.unlink()
    return path
