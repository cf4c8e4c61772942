"""scripts/launch_cost.py: a GPU-only benchmark; without a GPU it says so and exits non-zero instead of timing nothing."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "launch_cost.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_a_gpu():
    spec = importlib.util.spec_from_file_location("launch_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit, match="needs a GPU"):
        module.main(["--reps", "10"])
