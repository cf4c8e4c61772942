"""scripts/selection_skew.py: uses per key tile from a q2k selection, their load-balance figures, and a CPU run."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "selection_skew.py"
spec = importlib.util.spec_from_file_location("selection_skew", SCRIPT)
skew = importlib.util.module_from_spec(spec)
spec.loader.exec_module(skew)


def test_uses_and_row():
    # 4 query tiles x 2 choices over 5 key tiles: tile 0 chosen by all 4, tile 4 by none.
    index = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]], dtype=torch.int32)[None, None]  # [1, 1, 4, 2]
    uses = skew.uses_per_key_tile(index, 5)
    assert uses.tolist() == [[[4.0, 2.0, 1.0, 1.0, 0.0]]]
    row = skew.skew_row(uses)
    assert row["mean"] == pytest.approx(8 / 5) and row["max/mean"] == pytest.approx(4 / 1.6)
    assert row["unused"] == pytest.approx(0.2) and row["top 10% share"] == pytest.approx(0.5)  # top 1 of 5: 4 of 8


def test_cpu_run_prints_a_row_per_layer(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(skew.vsa_op, "topk_tiles", skew.vsa_op.topk_tiles)  # restored after the test
    skew.main(["--model", "dit_tiny", "--data", "synthetic", "attn.backend=torch"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) >= 2 and all(len(r.split("|")) == 8 for r in rows)
