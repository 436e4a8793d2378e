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
    model: str = option(
        "unparrot-rn-tiny-v1k",
        "open_clip architecture or an unparrot config (unparrot-rn-tiny[-v1k], unparrot-vit-tiny)",
    )
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
    init_logit_scale: float | None = option(
        None, "initial logit scale, e.g. 33.3 (temperature 0.03); default open_clip's 1/0.07"
    )
    seed: int = option(0, "seed of the model init and the data order")
    # data loader processes per training process (not `workers`: that is the engines' operator copies;
    # the old name still reads, as a flag and in configs)
    loader_workers: int = option(1, "data loader processes per training process", aliases=("--workers",))
    shuffle_buffer: int = option(1000, "samples in the shuffle buffer")
    # global (layout-independent) or sharded (scalable)
    data_order: str = option("global", "global (same batches for any process layout) or sharded (scalable)")
    # RandomResizedCrop scale (LaCLIP); None: no augmentation
    rrc_scale: tuple | None = option(
        (0.5, 1.0), "RandomResizedCrop scale range (LaCLIP: [0.5, 1.0]); null: no augmentation"
    )
    # LaCLIP: sample among the caption and its rewrites
    rewrites: bool = option(False, "LaCLIP: sample the caption among the original and its rewrites (.json 'rewrites')")
    # weight of the original caption among the rewrites
    original_weight: float = option(1.0, "relative weight of the original caption among the rewrites")
    # weights of rewrites 1, 2, ... (default 1 each; missing ones 1)
    rewrite_weights: list | None = option(
        None, "weights of rewrite 1, 2, ... (YAML list, e.g. [1, 1, 0.5, 0.5]; default 1 each)"
    )
    # probability of filling the text boxes (needs "boxes" in .json)
    mask_text_prob: float = option(
        0.0, "probability of filling the text boxes (.json 'boxes', from reshard --columns boxes)"
    )
    # extra texts/files for a dense vocabulary (eval prompts)
    vocab_texts: list = field(
        default_factory=list,
        metadata={
            "help": "extra texts or text files for a dense vocabulary (-v1k models): evaluation prompts, class names"
        },
    )
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
    export_open_clip: bool = option(
        True,
        "write RUN/open_clip/ at the end (open_clip_config.json + weights; "
        "open_clip, open_clip_train and CLIP_benchmark load it as "
        "local-dir:RUN/open_clip)",
    )
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


@dataclass
class _Place:
    """Where this process trains: its rank among `world` processes and its device."""

    rank: int
    world: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class _Run:
    """What the loop needs, built once by the steps before it."""

    cfg: TrainConfig
    out: Path
    place: _Place
    clip: object  # models.LoadedClip: the model, its tokenizer and image size
    model: object  # the bare model (checkpoints, clipping, the logit-scale clamp)
    ddp_model: object  # the model wrapped for DistributedDataParallel (the forward pass); `model` if one process
    opt: object
    vocab: list | None
    start_step: int
    steps: int  # the whole run's schedule
    warmup: int
    stop: int  # where this invocation stops (stop_at_step)
    loss_fn: object = None
    autocast: object = None


def train(cfg: TrainConfig | dict) -> dict:
    """Train; returns a summary dict (final loss, steps, samples seen, checkpoint path, samples/s, ...).

    The steps run in a fixed order because the run must be reproducible bit for bit from its seed: the
    model's initialisation draws from torch's RNG right after `manual_seed`, and the data loader's base seed
    draws from it when the loop starts; nothing in between may draw."""
    from .data import resolve_shards

    cfg = (TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg).validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    place = _setup_process(cfg)
    out = Path(cfg.out)
    shards = resolve_shards(cfg.train_data)
    resume_path, ckpt = _resume_point(cfg, out)
    run = _model_and_optimizer(cfg, out, place, shards, ckpt)
    if place.is_main:  # temp files of a killed run (its summary's; checkpoint temps are rewritten in place)
        remove_stale_temp(out)
    if run.start_step >= run.stop:  # a finished run resumed: nothing to do, nothing rewritten
        return _finished_summary(out, cfg, resume_path, run.start_step, run.steps, place.world, place.is_main)
    run.autocast = _autocast(cfg, place.device)
    stream, loader = _data(run, shards)
    logs = _Logs.open(run)
    last, step, t_start = _loop(run, loader, stream, logs)
    logs.bar.close()
    path, exported = _save_final(run, step, logs)
    return _write_summary(run, last, path, exported, t_start)


def _setup_process(cfg: TrainConfig) -> _Place:
    """Device, threads and the process group: from torchrun's environment (one process when absent), so the
    same call trains alone or as one of N processes."""
    import torch

    rank, world, local_rank = _dist_env()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return _Place(rank, world, local_rank, device)


def _resume_point(cfg: TrainConfig, out: Path):
    """(path, checkpoint dict) to continue from, or (None, None): `latest` may be absent (a first run), an
    explicit path may not."""
    import torch

    resume_path = None
    if cfg.resume:
        resume_path = _latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if cfg.resume != "latest" and not resume_path.exists():
            raise FileNotFoundError(f"resume checkpoint {cfg.resume} not found")
    ckpt = torch.load(resume_path, map_location="cpu", weights_only=True) if resume_path else None
    return resume_path, ckpt


def _model_and_optimizer(cfg: TrainConfig, out: Path, place: _Place, shards, ckpt) -> _Run:
    """The model (seeded just before it is built), its optimizer and the schedule, restored from `ckpt`
    when resuming. A dense-vocabulary model takes its vocabulary from the checkpoint when resuming, so a
    resumed run tokenizes exactly as it started even if the shards changed."""
    import torch
    from open_clip.loss import ClipLoss

    from ..models import load_clip, model_config

    dense = model_config(cfg.model).get("text_cfg", {}).get("vocab_size", 49408) < 49408
    vocab = None
    if dense:
        vocab = list(ckpt["unparrot_vocab"]) if ckpt and "unparrot_vocab" in ckpt else build_vocab_for(cfg, shards)
    torch.manual_seed(cfg.seed)
    clip = load_clip(cfg.model, cfg.pretrained, device=place.device, vocab=vocab, train=True)
    model = clip.model
    if cfg.init_logit_scale and not cfg.pretrained:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    if cfg.sync_bn and place.world > 1:
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
    if place.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[place.local_rank] if place.device.startswith("cuda") else None)
    loss_fn = ClipLoss(
        local_loss=False, gather_with_grad=True, cache_labels=True, rank=place.rank, world_size=place.world
    )
    steps = cfg.steps
    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)
    stop = min(steps, cfg.stop_at_step) if cfg.stop_at_step else steps
    return _Run(cfg, out, place, clip, model, ddp_model, opt, vocab, start_step, steps, warmup, stop, loss_fn)


def _autocast(cfg: TrainConfig, device: str):
    """The autocast context of the precision (None: fp32). `auto` is bf16 autocast on a GPU, fp32 on a CPU."""
    import torch

    precision = cfg.precision if cfg.precision != "auto" else ("amp" if device.startswith("cuda") else "fp32")
    if precision in ("amp", "bf16") and device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return None


def _data(run: _Run, shards):
    """The sample stream (from `start_step`, so a resumed run sees the batches it would have seen) and its
    loader; data workers are spawned, never forked, so they do not inherit the training threads."""
    import torch.utils.data as tud

    from .data import SampleMaker, TrainStream

    cfg, place = run.cfg, run.place
    maker = SampleMaker(
        run.clip.image_size,
        run.clip.tokenizer,
        seed=cfg.seed,
        rrc_scale=cfg.rrc_scale,
        use_rewrites=cfg.rewrites,
        original_weight=cfg.original_weight,
        rewrite_weights=tuple(cfg.rewrite_weights or ()),
        mask_text_prob=cfg.mask_text_prob,
    )
    stream = TrainStream(
        shards,
        maker,
        cfg.batch_size,
        run.stop,
        run.start_step,
        place.rank,
        place.world,
        cfg.seed,
        cfg.shuffle_buffer,
        cfg.data_order,
    )
    loader = tud.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.loader_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.loader_workers else None,
        multiprocessing_context="spawn" if cfg.loader_workers else None,
    )
    return stream, loader


@dataclass
class _Logs:
    """The run's records (main process only): config.json, metrics.jsonl (every step), TensorBoard and the
    progress bar (every `log_every` steps)."""

    run: _Run
    writer: object
    bar: object
    metrics_path: Path

    @classmethod
    def open(cls, run: _Run) -> "_Logs":
        """Writes config.json and cuts metrics.jsonl back to the resumed step (a resumed run rewrites what
        came after its checkpoint)."""
        from ..progress import progress_bar

        cfg, out, is_main = run.cfg, run.out, run.place.is_main
        writer = None
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                writer = None
        bar = progress_bar(
            total=run.stop,
            initial=run.start_step,
            desc=f"train {out.name}",
            unit="step",
            disable=not (is_main and cfg.progress),
        )
        metrics_path = out / "metrics.jsonl"
        if is_main and metrics_path.exists():
            lines = metrics_path.read_text().splitlines()
            kept = [ln for ln in lines if ln and json.loads(ln)["step"] <= run.start_step]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
        return cls(run, writer, bar, metrics_path)

    def record(self, last: dict):
        """One step's metrics; the step's checkpoint when one is due (never at the stop step: the final
        checkpoint follows the loop)."""
        run, cfg, done = self.run, self.run.cfg, last["step"]
        if not run.place.is_main:
            return
        due = done % cfg.log_every == 0 or done == run.stop
        self.bar.update(1)
        if due:
            self.bar.set_postfix(loss=f"{last['loss']:.3f}", sps=f"{last['samples_per_s']:.0f}")
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(last) + "\n")
        if self.writer is not None and due:
            for k in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait"):
                self.writer.add_scalar(f"train/{k}", last[k], done)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < run.stop:
            save_checkpoint(run.out, run.model, run.opt, cfg, done, run.vocab)


def _loop(run: _Run, loader, stream, logs: _Logs):
    """Steps from `start_step` to `stop`, timing each and the data wait within it; returns (the last step's
    metrics, the last step index, the start time)."""
    cfg = run.cfg
    t_start = time.perf_counter()
    wait_total = step_total = 0.0
    last = {"loss": float("nan")}
    t_prev = time.perf_counter()
    step = run.start_step
    for step, images, texts in _plain_worker_errors(loader):
        t_got = time.perf_counter()
        wait = t_got - t_prev
        lr = lr_at(step, cfg.lr, run.warmup, run.steps)
        total = _optimizer_step(run, images, texts, lr)
        t_done = time.perf_counter()
        wait_total += wait
        step_total += t_done - t_prev
        t_prev = t_done
        done = step + 1
        last = {
            "step": done,
            "loss": total,
            "lr": lr,
            "logit_scale": float(run.model.logit_scale.detach().exp()),
            "step_seconds": t_done - (t_got - wait),
            "wait_seconds": wait,
            "samples_seen": done * cfg.batch_size,
            "data_wait": wait_total / max(step_total, 1e-9),
            "samples_per_s": (done - run.start_step) * cfg.batch_size / max(t_done - t_start, 1e-9),
            "skipped_samples": stream.skipped,
        }
        logs.record(last)
        if done >= run.stop:
            break
    return last, step, t_start


def _optimizer_step(run: _Run, images, texts, lr: float) -> float:
    """One optimizer step at learning rate `lr`; returns the batch's loss. With `accum` > 1 the
    accumulation is exact for the contrastive loss (`accumulated`)."""
    import torch

    cfg, model = run.cfg, run.model
    for g in run.opt.param_groups:
        g["lr"] = lr
    run.ddp_model.train()
    run.opt.zero_grad(set_to_none=True)
    device = run.place.device
    images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
    if cfg.accum == 1:
        total = forward_backward(run.ddp_model, run.loss_fn, images, texts, run.autocast)
    else:
        micro = cfg.batch_size // cfg.accum // run.place.world
        total = accumulated(run.ddp_model, model, run.loss_fn, images, texts, micro, run.autocast)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return total


def _save_final(run: _Run, step: int, logs: _Logs):
    """The last checkpoint (final.pt when the whole schedule ran, else a step checkpoint to resume from)
    and, for a finished run, the open_clip export; then every process waits for the main one, so none
    exits before the files it may be asked about exist."""
    cfg, out = run.cfg, run.out
    path = exported = None
    if run.place.is_main:
        path = save_checkpoint(
            out, run.model, run.opt, cfg, max(step + 1, run.start_step), run.vocab, final=run.stop == run.steps
        )
        if cfg.export_open_clip and run.stop == run.steps:
            from ..models import export_open_clip

            exported = str(export_open_clip(path, out / "open_clip"))
        if logs.writer is not None:
            logs.writer.close()
    if run.place.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return path, exported


def _write_summary(run: _Run, last: dict, path, exported, t_start: float) -> dict:
    """summary.json, written last and atomically: its presence says the run (or this part of it) finished."""
    summary = {
        **last,
        "steps": run.stop,
        "planned_steps": run.steps,
        "checkpoint": str(path) if path else None,
        "open_clip": exported,
        "seconds": time.perf_counter() - t_start,
        "world_size": run.place.world,
        "model": run.cfg.model,
    }
    if run.place.is_main:
        atomic_write_bytes(run.out / "summary.json", json.dumps(summary, indent=1).encode())
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


def forward_backward(ddp_model, loss_fn, images, texts, autocast) -> float:
    """The whole batch's loss and gradients in one pass (no accumulation); the loss in float32 whatever
    the autocast, as open_clip computes it."""
    import contextlib

    with autocast or contextlib.nullcontext():
        fi, ft, scale = ddp_model(images, texts)[:3]
        loss = loss_fn(fi.float(), ft.float(), scale.float())
    loss.backward()
    return float(loss.detach())


def accumulated(ddp_model, model, loss_fn, images, texts, micro, autocast) -> float:
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
