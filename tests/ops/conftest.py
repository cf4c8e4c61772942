"""Fixtures shared by the ops tests (helpers that are not fixtures live in ops_utils.py)."""
import pytest

from vsa_train.ops.block_sparse import op as bs_op


@pytest.fixture(params=[False, True], ids=["one_tile", "tile_pairs"])
def tile_pairs(request, monkeypatch):
    """Runs the test for both loop variants of the block-sparse kernels: one 64-row tile per iteration, and two
    (op.TILE_PAIRS, read per call). Returns the setting."""
    monkeypatch.setattr(bs_op, "TILE_PAIRS", request.param)
    return request.param
