"""The server's settings, stated once: a ``ServeConfig`` field with its default, and its
flag in ``add_serve_arguments``. Both the single-process CLI (cli.py) and a Ray Serve
deployment (ray_app.py) build their ServeConfig here, from the same parser.

A new setting is two small additions: a field below (name, default, a comment) and
one ``add_argument`` whose ``dest`` is the field's name; ``config_from_args`` copies
every field it finds on the parsed flags, and a Ray Serve config's ``args:`` takes the
flag's name with underscores (``--no-verify`` is ``no_verify: true``). Only flags
whose value needs converting (the folder, MiB to bytes, the API key file) are named
in ``config_from_args``.

The batch ceiling is computed once, by ``batch_ceilings``, from the folder's profile
(the runtime's ``batch_limits``) and ``--max-batch``; the worker, the model card, the
request checks and Ray's deployment options all read it from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kolors_trt.runtime.cli import add_runtime_cache_argument
from kolors_trt.runtime.errors import InputError
from kolors_trt.runtime.folder import BACKENDS, Limits, ModelFolder
from kolors_trt.runtime.request import batch_limits
from kolors_trt.runtime.spec import parse_size

logger = logging.getLogger(__name__)

API_KEY_ENV = "KOLORS_TRT_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_REPLICAS = 1
MIB = 2**20


class ConfigError(InputError):
    """A server setting is invalid; names the flag, what it takes and what it got."""


@dataclass(frozen=True)
class ServeConfig:
    folder: str  # engine folder (TensorRT) or export folder (ONNX Runtime)
    backend: str = "auto"
    max_batch: Optional[int] = None  # images per UNet batch; None: the folder's (engine profile, or Limits())
    max_size: Optional[int] = None  # export folders: the largest side; None: Limits()'s (engine folders: profile)
    max_wait_ms: float = 25.0  # how long the oldest request waits for company
    max_queue: int = 64  # requests waiting (not running); more answer 429
    timeout_s: float = 300.0  # per request, from arrival to answer; then 504
    drain_timeout_s: float = 30.0  # after SIGTERM: how long accepted requests may still run
    header_timeout_s: float = 10.0  # a connection whose request head is not complete by then is closed
    cache_dir: Optional[str] = None  # IP tokens of reference images, kept across restarts
    cache_max_bytes: int = 1024 * MIB  # bound of cache_dir; the least recently used files go first
    runtime_cache: Optional[str] = None  # TensorRT-RTX's just-in-time kernels, kept across restarts
    api_key: Optional[str] = field(default=None, repr=False)  # Bearer token for every route but health
    max_body_bytes: int = 20 * MIB
    max_prompt_chars: int = 4000  # the text encoder reads 256 tokens; this bounds the work to tokenize
    max_steps: int = 1000  # num_inference_steps taken (the scheduler has 1100 training timesteps)
    default_size: Optional[str] = None  # HEIGHTxWIDTH of a request without size; None: the folder's manifest
    default_steps: Optional[int] = None  # num_inference_steps of a request without it; None: the manifest's
    model_id: str = "kolors"  # the name /v1/models lists and requests may pass as `model`
    verify: bool = True  # hash graphs/plans against the manifest (only files changed since the last check)
    access_log: bool = False  # one log line per request (method, path, status, seconds, x-request-id)
    failure_threshold: int = 3  # consecutive failed batches before /health/ready says 503
    probe_interval_s: float = 5.0  # while failing: how often the idle worker re-runs the warm-up request
    playground: bool = True  # the page on GET / and /playground
    lora_dir: Optional[str] = None  # LoRAs requests may name, <name>.safetensors, loaded and hashed on first use

    def __post_init__(self):
        least = {"max_wait_ms": 0, "max_queue": 1, "timeout_s": 1e-3, "drain_timeout_s": 0,
                 "header_timeout_s": 1e-3, "cache_max_bytes": 1, "max_body_bytes": 1, "max_prompt_chars": 1,
                 "max_steps": 1, "failure_threshold": 1, "probe_interval_s": 0, "max_batch": 1, "default_steps": 1,
                 "max_size": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"serve: --{name.replace('_', '-')} must be >= {low}, found {value}")
        if self.default_steps is not None and self.default_steps > self.max_steps:
            raise ConfigError(f"serve: --default-steps {self.default_steps} is over --max-steps {self.max_steps}")
        if self.default_size is not None:
            try:
                parse_size(self.default_size)
            except ValueError as err:
                raise ConfigError(f"serve: --default-size: {err}") from None
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ConfigError(f"serve: --lora-dir {self.lora_dir}: not a folder; give the folder of the "
                              "<name>.safetensors LoRAs requests may name")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("serve: the API key is empty; put a non-empty key in --api-key-file or "
                              f"{API_KEY_ENV}")

    @property
    def limits(self) -> Limits:
        """What an export folder accepts (engine folders take their build profile)."""
        default = Limits()
        return Limits(self.max_size or default.max_side, self.max_batch or default.max_batch)

    @property
    def default_hw(self) -> tuple[Optional[int], Optional[int]]:
        """(height, width) of a request without size; (None, None): the manifest's."""
        return parse_size(self.default_size) if self.default_size is not None else (None, None)

    def key_matches(self, presented: str) -> bool:
        """Constant-time comparison of a presented Bearer token with the key."""
        return self.api_key is not None and hmac.compare_digest(presented.encode(), self.api_key.encode())


def batch_ceilings(folder: ModelFolder, max_batch: Optional[int]) -> dict[bool, int]:
    """{do_cfg: the most images one batch takes}: the folder's profile (an export folder's comes from --max-batch
    already), capped by --max-batch on an engine folder, whose profile it may not exceed."""
    most = {do_cfg: batch_limits(folder, do_cfg)[1] for do_cfg in (True, False)}
    if max_batch is None:
        return most
    if max_batch > max(most.values()):
        raise ConfigError(f"serve: --max-batch {max_batch} is more than the engine profile's {max(most.values())} "
                          f"images per batch of {folder.root}; rebuild the engines or pass at most "
                          f"{max(most.values())}")
    return {do_cfg: min(m, max_batch) for do_cfg, m in most.items()}


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


# ---- the flags ---------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, found {value}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The application's flags (also a Ray Serve config's ``args:``); each ``dest`` is a ServeConfig field."""
    d = ServeConfig
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engines", metavar="DIR", help="engine folder (kolors-trt build), TensorRT")
    src.add_argument("--onnx", metavar="DIR", help="export folder (kolors-trt export), ONNX Runtime")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS,
                   help="default: onnxruntime for --onnx, the build target for --engines")
    p.add_argument("--max-batch", "--max-batch-size", dest="max_batch", type=int, metavar="N",
                   help=f"images per UNet batch (default: an engine folder's profile; {Limits().max_batch} for an "
                        "export folder)")
    p.add_argument("--max-size", dest="max_size", type=int, metavar="PX",
                   help=f"export folders: the largest image side taken (default {Limits().max_side}); engine "
                        "folders take their build profile")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a request waits for others to batch with (default {d.max_wait_ms:g})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting for a batch; more get 429 (default {d.max_queue})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help=f"per request, arrival to answer; then 504 and the request stops (default {d.timeout_s:g})")
    p.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s,
                   help=f"after SIGTERM, how long accepted requests may still run (default {d.drain_timeout_s:g})")
    p.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                   help="close a connection whose request head (request line and headers) is not complete "
                        f"within this many seconds (default {d.header_timeout_s:g})")
    p.add_argument("--api-key-file", metavar="F",
                   help="a file holding the API key every route but /health/* then needs as 'Authorization: Bearer' "
                        f"(default: ${API_KEY_ENV}; neither: no key)")
    p.add_argument("--cache-dir", metavar="DIR", help="folder keeping reference images' IP tokens across restarts")
    p.add_argument("--cache-max-mb", type=float, default=d.cache_max_bytes / MIB,
                   help="the most --cache-dir holds, in MiB; the least recently used files go first "
                        f"(default {d.cache_max_bytes / MIB:g})")
    add_runtime_cache_argument(p)
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MIB,
                   help=f"request body limit in MiB (default {d.max_body_bytes / MIB:g})")
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help=f"longest prompt taken (default {d.max_prompt_chars})")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help=f"most num_inference_steps a request may ask (default {d.max_steps})")
    p.add_argument("--default-size", metavar="HxW",
                   help="HEIGHTxWIDTH of a request without size, like every CLI size (the API's size is "
                        "WIDTHxHEIGHT); default: the folder's manifest (1024x1024 for Kolors)")
    p.add_argument("--default-steps", type=int, metavar="N",
                   help="num_inference_steps of a request without it (default: the manifest's, 50 for Kolors)")
    p.add_argument("--model-name", dest="model_id", default=d.model_id,
                   help=f"the model id clients see (default {d.model_id!r})")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the graphs/plans against the manifest")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per request: client, method, path, status, seconds, x-request-id")
    p.add_argument("--no-playground", dest="playground", action="store_false",
                   help="no playground page on GET / and /playground")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="a folder of LoRAs (<name>.safetensors) that requests may name in `lora`; each is loaded and "
                        "hashed on first use; GET /v1/loras lists them (default: none, LoRA off)")


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    """How many replicas of the server Ray runs (also a Ray Serve config's ``args:``)."""
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=_positive, metavar="N",
                       help=f"with --ray: replicas, one Pipeline each (default {DEFAULT_REPLICAS})")
    scale.add_argument("--autoscale", metavar="MIN:MAX",
                       help="with --ray: let Ray keep between MIN and MAX replicas by their load")


# flags whose value is converted on the way into ServeConfig; every other field is copied by name
CONVERTED = frozenset({"folder", "api_key", "max_body_bytes", "cache_max_bytes"})


def config_from_args(args, read_key: bool = True) -> ServeConfig:
    """The server's settings from parsed flags. ``read_key=False`` leaves the API key out (a Ray replica reads
    --api-key-file or $KOLORS_TRT_API_KEY itself, so the key never travels inside a deployment)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)
              if f.name not in CONVERTED and hasattr(args, f.name)}
    return ServeConfig(folder=args.engines or args.onnx, **values,
                       api_key=read_api_key(args.api_key_file) if read_key else None,
                       max_body_bytes=int(args.max_body_mb * MIB), cache_max_bytes=int(args.cache_max_mb * MIB))


__all__ = ["API_KEY_ENV", "ConfigError", "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_REPLICAS", "ServeConfig",
           "add_scale_arguments", "add_serve_arguments", "batch_ceilings", "config_from_args", "read_api_key"]
