"""The `compute_bound` marker (tests/conftest.py): its fixtures and body compile at XLA's default
optimisation level, every other test at level 0, and the level is restored after the test."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture
def level_at_setup() -> bool:
    return jax.config.read("jax_disable_most_optimizations")


@pytest.mark.compute_bound
def test_compute_bound_compiles_optimised_in_setup_and_body(level_at_setup: bool) -> None:
    assert level_at_setup is False
    assert jax.config.read("jax_disable_most_optimizations") is False


def test_unmarked_test_keeps_the_suite_level(level_at_setup: bool) -> None:
    # conftest sets level 0 unless the environment already chose one.
    import os

    expected = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true")
    assert level_at_setup is expected
    assert jax.config.read("jax_disable_most_optimizations") is expected
