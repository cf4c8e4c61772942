"""Which config the block-sparse launchers use: configs.py's default per pairing, or the autotuner's pick."""
import triton

from vsa_train.ops.block_sparse import configs, launch


class RecordingKernel:
    """Stands for an @triton.autotune kernel: records autotuned (kernel[grid]) and direct (kernel.fn[grid]) launches."""

    def __init__(self):
        self.autotuned, self.direct = [], []
        self.best_config = triton.Config({}, num_warps=8, num_stages=4)

    @property
    def fn(self):
        return _Direct(self)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.autotuned.append(kwargs)


class _Direct:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.direct.append(kwargs)


def test_defaults_depend_on_pairing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU's defaults (the interpreter gets one stage)
    assert (configs.fwd_default(True).num_stages, configs.fwd_default(False).num_stages) == (2, 3)
    assert configs.bwd_default(True).num_warps == configs.bwd_default(False).num_warps == 4
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert configs.fwd_default(False).num_stages == 1


def test_default_config_launches_without_autotuner(monkeypatch):
    monkeypatch.delenv("VSA_AUTOTUNE", raising=False)
    monkeypatch.setattr(launch, "_TUNED", {})
    kernel = RecordingKernel()
    asked = []

    def default(pair):
        asked.append(pair)
        return triton.Config({}, num_warps=4, num_stages=2)

    for _ in range(2):
        launch.launch_tuned(kernel, (1,), (64, "bf16", True), default, 1, X=2)
    assert asked == [True]  # chosen once per key, for the key's pairing
    assert kernel.autotuned == []
    assert len(kernel.direct) == 2
    assert all(d["X"] == 2 and d["num_warps"] == 4 and d["num_stages"] == 2 for d in kernel.direct)


def test_full_search_uses_autotuner_once_per_key(monkeypatch):
    monkeypatch.setenv("VSA_AUTOTUNE", "full")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(launch, "_TUNED", {})
    kernel = RecordingKernel()
    for _ in range(3):
        launch.launch_tuned(kernel, (1,), (128, "bf16", False), configs.bwd_default, X=1)
    assert len(kernel.autotuned) == 1  # the search runs on the first launch only
    assert len(kernel.direct) == 2 and all(d["num_warps"] == 8 and d["num_stages"] == 4 for d in kernel.direct)
