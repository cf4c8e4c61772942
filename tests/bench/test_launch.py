"""vsa_train.bench.launch: a GPU-only benchmark; without a GPU it says so and exits non-zero instead of timing nothing."""
import pytest
import torch

from vsa_train.bench import launch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a GPU"):
        launch.main(["--reps", "10"])
