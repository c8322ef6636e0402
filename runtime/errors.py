"""The product's error root and its two branches.

Every error the toolkit raises on purpose derives from ``KolorsTrtError`` and one
of two branches, so a caller maps by type, never by message text:

- ``InputError`` (also a ``ValueError``): the caller's input is wrong: a bad
  argument, image, folder or manifest. The CLI prints one line and exits 1; the
  server answers 4xx. Retrying the same input fails the same way.
- ``ServiceError`` (also a ``RuntimeError``): ours or the host's: a missing
  package, no GPU, an engine that failed or overflowed. The server answers 5xx.

Each stage keeps its own named subclasses (``SpecError``, ``ImageInputError``,
``BackendError``, ...); this module only fixes where they hang.
"""

from __future__ import annotations


class KolorsTrtError(Exception):
    """Root of every error kolors-trt raises on purpose."""


class InputError(KolorsTrtError, ValueError):
    """The caller's input (argument, image, folder, manifest) is wrong; retrying it fails the same way."""


class ServiceError(KolorsTrtError, RuntimeError):
    """The service or the host failed (package, GPU, engine, memory); the input may be fine."""


__all__ = ["InputError", "KolorsTrtError", "ServiceError"]
