"""`unparrot deparrot POOL`: the deparrot stage over a pool (ops/deparrot.py), on either engine.

The operator does the work; this module fills in what only the pool knows: the parrot stage's CoTR
options (so `residual_cotr` is that stage's CoTR of the new caption) and, in rewrite mode, the cache file
under POOL/cache/deparrot/. Every default lives in `DeparrotConfig`; the CLI's flags are generated from it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from .flags import option
from .pool import Pool
from .rewrite import RewriteConfig as R

COTR_OPTIONS = ("stopwords", "min_len", "fuzzy", "fuzzy_min_len", "keep_non_latin")


@dataclass
class DeparrotConfig:
    """Everything that defines a deparrot run; `validate` checks it before any work."""

    # strip (deterministic, fast) or rewrite (an LLM told which words not to spell)
    mode: str = option(
        "strip", "strip (remove the spelled words; deterministic) or rewrite (LLM rewrite, checked, strip fallback)"
    )
    # fewer content words left -> null caption
    min_words: int = option(
        1, "a caption left with fewer content words (not stop words, not 'sign', 'logo', ...) is null"
    )
    stage: str = option("deparrot", "output stage name")
    spot_stage: str = option("spot", "stage with the spotted texts")
    parrot_stage: str = option(
        "parrot", "stage with the co-embedded words (its CoTR options are used for residual_cotr)"
    )
    engine: str = option("local", "local (worker processes) or ray (Ray Data)")
    workers: int = option(1, "worker processes (Ray: operator actors); rewrite mode: keep 1 for a local model")
    batch_size: int = option(256, "samples per operator call")
    overwrite: bool = option(False, "recompute a stage made with other parameters")
    # rewrite mode
    backend: str = option(R.backend, "rewrite mode: llama-cpp (in-process GGUF) or openai (OpenAI-compatible server)")
    model: str | None = option(
        None, "rewrite mode: GGUF path (default: bundled Gemma-3-270M) or the server's model name"
    )
    base_url: str | None = option(None, "rewrite mode, openai backend: the server, e.g. http://host:8000/v1")
    api_key_env: str = option(R.api_key_env, "environment variable holding the API key")
    concurrency: int = option(R.concurrency, "openai backend: requests in flight")
    timeout: float = option(R.timeout, "openai backend: seconds per request")
    temperature: float = option(0.7, "sampling temperature")
    top_p: float = option(R.top_p, "nucleus sampling")
    max_tokens: int = option(48, "tokens per rewrite")
    retries: int = option(
        R.retries, "extra attempts (new seeds) for a rewrite that fails its checks, before the strip fallback"
    )
    seed: int = option(R.seed, "sampling seed")
    threads: int | None = option(None, "llama-cpp threads")
    max_rewrite_chars: int = option(1000, "longer captions are stripped, not sent to the model")
    backend_options: dict = field(default_factory=dict, metadata={"help": "extra backend options (YAML mapping)"})

    def validate(self) -> "DeparrotConfig":
        from .ops.deparrot import MODES

        if self.mode not in MODES:
            raise ValueError(f"deparrot: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.min_words < 1 or self.retries < 0 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("deparrot: need min_words >= 1, retries >= 0, workers >= 1, batch_size >= 1")
        if self.mode == "rewrite" and self.backend == "eda":
            raise ValueError("deparrot: rewrite mode needs an LLM backend (llama-cpp or openai), not eda")
        return self


def parrot_options(pool: Pool, parrot_stage: str) -> dict:
    """The CoTR options the parrot stage was run with (its recorded parameters)."""
    info = pool.stage_info(parrot_stage)
    if info is None:
        raise FileNotFoundError(f"deparrot needs the {parrot_stage!r} stage first (run `unparrot profile`)")
    params = info.get("params", {})
    return {k: params[k] for k in COTR_OPTIONS if k in params}


def check_parrot_source(pool: Pool, cfg: DeparrotConfig):
    """The parrot stage's co-embedded words must come from the same spotted texts the new captions are
    checked against; otherwise residual_cotr would not be the parrot stage's CoTR."""
    used = (pool.stage_info(cfg.parrot_stage) or {}).get("params", {}).get("spot_stage", "spot")
    if used != cfg.spot_stage:
        raise ValueError(
            f"deparrot: stage {cfg.parrot_stage!r} was computed on spot stage {used!r}, not "
            f"{cfg.spot_stage!r}: pass spot_stage={used!r} or rerun parrot on {cfg.spot_stage!r}"
        )


def operator_params(pool: Pool, cfg: DeparrotConfig) -> dict:
    """The operator's parameters for this pool: the config's, the parrot stage's CoTR options, the cache."""
    check_parrot_source(pool, cfg)
    params = {
        "mode": cfg.mode,
        "min_words": cfg.min_words,
        "spot_stage": cfg.spot_stage,
        "parrot_stage": cfg.parrot_stage,
        **parrot_options(pool, cfg.parrot_stage),
    }
    if cfg.mode == "rewrite":
        params.update(
            {
                k: getattr(cfg, k)
                for k in (
                    "backend",
                    "model",
                    "base_url",
                    "api_key_env",
                    "concurrency",
                    "timeout",
                    "temperature",
                    "top_p",
                    "max_tokens",
                    "retries",
                    "seed",
                    "threads",
                    "max_rewrite_chars",
                    "backend_options",
                )
            }
        )
        params["cache"] = str(pool.root / "cache" / cfg.stage / "rewrites.jsonl")
    return params


def deparrot(
    pool: Pool | str,
    config: DeparrotConfig | None = None,
    progress: bool = True,
    engine_options: dict | None = None,
    **overrides,
):
    """Run the deparrot stage over `pool` (resumable; see ops/deparrot.py) and return its StageSummary.

    `engine_options`: the Ray engine's address, num_cpus, num_gpus (see engine.EngineConfig)."""
    from .engine import run

    cfg = dataclasses.replace(config or DeparrotConfig(), **overrides).validate()
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    t0 = time.time()
    s = run(
        pool,
        "deparrot",
        operator_params(pool, cfg),
        engine=cfg.engine,
        stage=cfg.stage,
        workers=cfg.workers,
        batch_size=cfg.batch_size,
        overwrite=cfg.overwrite,
        progress=progress,
        **(engine_options or {}),
    )
    s.seconds = max(s.seconds, time.time() - t0)
    return s


def deparrot_counts(pool: Pool | str, stage: str = "deparrot") -> dict:
    """Samples per mode, null captions and removed words of a finished stage (report and summaries)."""
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    df = pool.load(stage, columns=["deparrot_caption", "deparrot_mode", "removed_words", "residual_cotr"])
    removed = sum(len(ws) for ws in df["removed_words"] if ws is not None)
    return {
        "samples": len(df),
        "modes": df["deparrot_mode"].value_counts().to_dict(),
        "null": int(df["deparrot_caption"].isna().sum()),
        "kept": int(df["deparrot_caption"].notna().sum()),
        "removed_words": int(removed),
        "max_residual_cotr": float(df["residual_cotr"].max()) if len(df) else 0.0,
    }


__all__ = ["DeparrotConfig", "deparrot", "deparrot_counts", "operator_params"]
