import pytest


@pytest.fixture(autouse=True)
def _cpus_free_after_each_test(nothing_left_holding_cpus):
    """Every test here leaves the session's Ray CPUs free (tests/conftest.py)."""
    yield
