"""The ``serve:`` section of the config tree: :class:`sparserm.config.ServeConfig`, loaded on its own."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sparserm.config import AutoscalingSpec, Config, ServeConfig, load_config

__all__ = ["AutoscalingSpec", "ServeConfig", "load_serve_config"]


def load_serve_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """Defaults <- a YAML file (its ``serve:`` section; other sections are validated too) <- overrides.

    Overrides may omit the ``serve.`` prefix: ``max_batch_size=32`` is ``serve.max_batch_size=32``.
    """
    prefixed = [o if o.split("=", 1)[0].split(".")[0] in _TOP_LEVEL else f"serve.{o}" for o in overrides]
    return load_config(path, prefixed).serve


_TOP_LEVEL = {f.name for f in dataclasses.fields(Config)}  # every section: steer., fpo., tracking. too
