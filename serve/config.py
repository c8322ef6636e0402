"""The server's settings and their defaults, stated once: the CLI parser and a Ray
deployment both build a ``ServeConfig``; nothing else holds a default.

The batch ceiling has no number here: ``max_batch_size=None`` means the engine
profile's (``Pipeline.batch_limits``), which the worker reads after loading.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kolors_trt.runtime.errors import InputError
from kolors_trt.runtime.folder import Limits

logger = logging.getLogger(__name__)

API_KEY_ENV = "KOLORS_TRT_API_KEY"


class ConfigError(InputError):
    """A server setting is invalid; names the flag, what it takes and what it got."""


@dataclass(frozen=True)
class ServeConfig:
    folder: str  # engine folder (TensorRT) or export folder (ONNX Runtime)
    backend: str = "auto"
    max_batch_size: Optional[int] = None  # images per UNet batch; None: the engine profile's most
    max_wait_ms: float = 25.0  # how long the oldest request waits for company
    max_queue: int = 64  # requests waiting (not running); more answer 429
    timeout_s: float = 300.0  # per request, from arrival to answer; then 504
    drain_timeout_s: float = 30.0  # after SIGTERM: how long accepted requests may still run
    cache_dir: Optional[str] = None  # IP tokens of reference images, kept across restarts
    runtime_cache: Optional[str] = None  # TensorRT-RTX's just-in-time kernels, kept across restarts
    api_key: Optional[str] = field(default=None, repr=False)  # Bearer token for every route but health
    max_body_bytes: int = 20 * 1024 * 1024
    max_prompt_chars: int = 4000  # the text encoder reads 256 tokens; this bounds the work to tokenize
    model_id: str = "kolors"  # the name /v1/models lists and requests may pass as `model`
    verify: bool = True  # hash graphs/plans against the manifest (only files changed since the last check)
    limits: Limits = Limits()  # export folders: the largest side and batch accepted (engine folders: their profile)
    failure_threshold: int = 3  # consecutive failed batches before /health/ready says 503
    probe_interval_s: float = 5.0  # while failing: how often the idle worker re-runs the warm-up request
    playground: bool = True  # the page on GET / and /playground

    def __post_init__(self):
        positive = {"max_wait_ms": (self.max_wait_ms, 0), "max_queue": (self.max_queue, 1),
                    "timeout_s": (self.timeout_s, 1e-3), "drain_timeout_s": (self.drain_timeout_s, 0),
                    "max_body_bytes": (self.max_body_bytes, 1), "max_prompt_chars": (self.max_prompt_chars, 1),
                    "failure_threshold": (self.failure_threshold, 1), "probe_interval_s": (self.probe_interval_s, 0)}
        for name, (value, least) in positive.items():
            if value < least:
                raise ConfigError(f"serve: --{name.replace('_', '-')} must be >= {least}, found {value}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError(f"serve: --max-batch-size must be >= 1, found {self.max_batch_size}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("serve: the API key is empty; put a non-empty key in --api-key-file or "
                              f"{API_KEY_ENV}")

    def key_matches(self, presented: str) -> bool:
        """Constant-time comparison of a presented Bearer token with the key."""
        return self.api_key is not None and hmac.compare_digest(presented.encode(), self.api_key.encode())


def read_api_key(path: Optional[str]) -> Optional[str]:
    """The key from ``path`` (one line, surrounding whitespace dropped), else from $KOLORS_TRT_API_KEY, else None."""
    if path is not None:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"serve: cannot read --api-key-file {path} ({err})") from None
        if not key or "\n" in key:
            raise ConfigError(f"serve: --api-key-file {path} must hold one non-empty line (the key)")
        return key
    key = os.environ.get(API_KEY_ENV)
    if key is not None:
        key = key.strip()
        if not key:
            raise ConfigError(f"serve: {API_KEY_ENV} is set but empty")
    return key


__all__ = ["API_KEY_ENV", "ConfigError", "ServeConfig", "read_api_key"]
