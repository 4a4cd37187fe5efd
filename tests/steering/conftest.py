"""Fixtures of the steering tests: the steering fixtures (``tiny_saes``, ``triples_file``, ``steer_overrides``,
``steer_config``, ``steer_map``) are in ``tests/conftest.py``, shared with ``tests/serve``."""
