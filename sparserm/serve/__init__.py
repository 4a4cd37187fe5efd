"""The reward-model service: a Ray Serve app over a SparseRM folder (HTTP + DeploymentHandle) and its clients;
and the steered chat service over a steering map (OpenAI's chat completions, :mod:`.steer_app`).

``sparserm serve rm RM_DIR`` starts the first, ``sparserm serve steer MAP_DIR`` the second, ``sparserm serve all``
both; :class:`RewardClient` / :class:`HTTPRewardClient` call the reward model from Python,
:func:`score_dataset` from Ray Data and :class:`SparseRMReward` from TRL's ``GRPOTrainer``. What every sparserm HTTP
app shares (binding, bearer auth, size limits, the one error body and its OpenAPI entries) is :mod:`.guard`,
:mod:`.limits` and :mod:`.errors`.
"""
from __future__ import annotations

from sparserm.serve.config import AutoscalingSpec, ServeConfig, load_serve_config
from sparserm.serve.errors import ErrorBody, ServeRequestError
from sparserm.serve.options import deployment_options, validate_serve

__all__ = ["ServeConfig", "AutoscalingSpec", "load_serve_config", "validate_serve", "deployment_options",
           "ServeRequestError", "ErrorBody", "RewardClient", "HTTPRewardClient", "score_dataset", "SparseRMReward",
           "build_app", "start", "build_steer_app", "start_steer", "start_all"]

_LAZY = {"RewardClient": "client", "HTTPRewardClient": "client", "score_dataset": "client",
         "SparseRMReward": "client", "build_app": "app", "start": "app", "build_steer_app": "steer_app",
         "start_steer": "steer_app", "start_all": "steer_app"}


def __getattr__(name: str):  # ray.serve and the clients are imported on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"sparserm.serve.{_LAZY[name]}"), name)
    raise AttributeError(name)
