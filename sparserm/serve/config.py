"""The ``serve:`` section of the config tree: :class:`sparserm.config.ServeConfig`, loaded on its own."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sparserm.config import AutoscalingSpec, Config, ConfigError, ServeConfig, load_config

__all__ = ["AutoscalingSpec", "ServeConfig", "load_serve_config"]


def load_serve_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """Defaults <- a YAML file (its ``serve:`` section; other sections are validated too) <- overrides.

    Overrides may omit the ``serve.`` prefix: ``max_batch_size=32`` is ``serve.max_batch_size=32``. A key of
    another section is refused: the service reads nothing of it (the RM folder or map it loads holds its own).
    """
    prefixed = []
    for o in overrides:
        head = o.split("=", 1)[0].split(".")[0]
        if head != "serve" and head in _SECTIONS:
            raise ConfigError(f"override {o}: a service takes serve.* settings; its {head} settings are the ones "
                              "the RM folder or steering map it serves was made with")
        prefixed.append(o if head == "serve" else f"serve.{o}")
    return load_config(path, prefixed).serve


_SECTIONS = {f.name for f in dataclasses.fields(Config)}
