"""The ``serve:`` section's rules and the Ray Serve options it makes (its dataclasses and defaults live in
:mod:`sparserm.config`: :class:`ServeConfig`, :class:`AutoscalingSpec`)."""
from __future__ import annotations

from typing import Any

from sparserm.config import ConfigError, ServeConfig, to_dict

__all__ = ["deployment_options", "validate_serve"]


def validate_serve(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` if every rule holds, else ``ConfigError`` naming the ``serve.`` key (``Config.validate`` calls it)."""
    def check(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"serve.{key}={value!r} is invalid: expected {expected}")

    check(1 <= cfg.port <= 65535, "port", cfg.port, "1..65535")
    check(cfg.replicas >= 1, "replicas", cfg.replicas, ">= 1")
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        check(0 <= a.min_replicas <= a.max_replicas and a.max_replicas >= 1, "autoscaling",
              to_dict(a), "0 <= min_replicas <= max_replicas, max_replicas >= 1")
    check(cfg.max_batch_size >= 1, "max_batch_size", cfg.max_batch_size, ">= 1")
    check(cfg.max_batch_tokens >= 0, "max_batch_tokens", cfg.max_batch_tokens, ">= 0")
    check(cfg.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", cfg.batch_wait_timeout_s, ">= 0")
    check(cfg.max_ongoing_requests >= 1, "max_ongoing_requests", cfg.max_ongoing_requests, ">= 1")
    check(cfg.max_items_per_request >= 1, "max_items_per_request", cfg.max_items_per_request, ">= 1")
    check(cfg.max_text_chars >= 1, "max_text_chars", cfg.max_text_chars, ">= 1")
    check(cfg.overlong in ("reject", "truncate"), "overlong", cfg.overlong, "reject|truncate")
    check(cfg.num_cpus >= 0, "num_cpus", cfg.num_cpus, ">= 0 (per replica)")
    check(cfg.num_gpus >= 0, "num_gpus", cfg.num_gpus, ">= 0 (per replica)")
    return cfg


def deployment_options(cfg: ServeConfig) -> dict:
    """Keyword arguments for ``Deployment.options``: resources per replica, and a fixed replica count or the
    autoscaling config."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        # a replica being stopped (downscale, redeploy) finishes what it accepted first
        "graceful_shutdown_timeout_s": 30.0,
        "logging_config": {"enable_access_log": cfg.access_log},
    }
    if cfg.autoscaling is not None:
        auto = {k: v for k, v in to_dict(cfg.autoscaling).items() if v is not None}
        opts["autoscaling_config"] = auto  # num_replicas left unset: the autoscaler owns it
    else:
        opts["num_replicas"] = cfg.replicas
    return opts
