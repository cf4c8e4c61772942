"""Fixtures shared by the ops tests (helpers that are not fixtures live in ops_utils.py)."""
import pytest

from vsa_train.ops import KernelOptions


@pytest.fixture(params=[False, True], ids=["one_tile", "tile_pairs"])
def options(request):
    """Runs the test for both loop variants of the block-sparse kernels: one 64-row tile per iteration, and two.
    Returns the KernelOptions to pass (outputs NaN-poisoned, so that an element no kernel wrote fails the test)."""
    return KernelOptions(tile_pairs=request.param, poison_outputs=True)
