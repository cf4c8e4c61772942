"""model=wan: a tiny random diffusers WanTransformer3DModel trained by the trainer on the CPU, dense and VSA.

Dense-equivalence of the VSA processor at all tiles is tests/test_diffusers.py's; here: shape from the config or a
folder, FLOPs against FlopCounterMode, training, exact resume, gates in the checkpoint, sampling, export of the
transformer alone (WanPipeline folders: tests/test_wan_export.py), refusals.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vsa_train import config_schema, trainer
from vsa_train.data import data_spec
from vsa_train.flops import training_flops_per_sample
from vsa_train.errors import MissingInput
from vsa_train.integrations.diffusers import export_run
from vsa_train.models.wan_vsa import VSAWanTransformer3DModel
from vsa_train.models import build_model
from vsa_train.sampling import generate, load_model
from vsa_train.schedules import SparsitySchedule

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("wan_train")  # one xdist worker: the module-scoped folder and runs built once
sys.path.insert(0, str(ROOT / "tests"))
from test_trainer import TINY, _losses, _run, latest_checkpoint  # noqa: E402  (4 frames x 8 x 8 pixels)

SHAPE = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, freq_dim=32)
WAN = ["model=wan", *(f"model.{k}={v}" for k, v in SHAPE.items())]
VSA = ["attn=vsa", "attn.tile=[2,2,2]", "attn.sparsity=0.5", "attn.backend=torch"]  # 4 of 8 tiles
FAST = ["optim.lr=3e-3", "optim.warmup_steps=0", "train.eval_every=100", "train.ckpt_every=100"]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[*TINY, "run_dir=/tmp/unused", *overrides])


def _save_wan(path, text_dim=64, seed=0):
    """A tiny random text-to-video Wan for 3-channel pixels and the built-in caption encoder (width 64)."""
    torch.manual_seed(seed)
    WanTransformer3DModel(**SHAPE, in_channels=3, out_channels=3, text_dim=text_dim,
                          rope_max_seq_len=32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _save_wan(tmp_path_factory.mktemp("wan") / "transformer")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder):
    """VSA finetuning of the folder: 2 steps then resumed to 4 (split), and 4 straight; EMA kept."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest so (conftest's one_thread is per test)
    root = tmp_path_factory.mktemp("runs")
    args = [*WAN, f"model.path={folder}", *VSA, *FAST, "train.ema=0.9"]
    try:
        _run(root / "split", *args, "train.max_steps=2")
        _run(root / "split", *args, "train.max_steps=4")
        _run(root / "straight", *args, "train.max_steps=4")
    finally:
        torch.set_num_threads(threads)
    return root


def _counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # CPU fused SDPA counts 0
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("attn", [{"name": "dense"}, {"name": "vsa", "tile": [2, 2, 2], "sparsity": 0.5}])
def test_flops_match_flop_counter(attn, one_thread):
    """Every matmul of Wan is in the analytic count: dense is exact; VSA's torch backend adds only the tile means
    (0/1 matmuls over each tile's rows, 2·S·d per q, k, v and layer), which the count leaves out on purpose."""
    B, video_shape, L, text_dim = 2, (4, 8, 8), 5, 24
    model_cfg = {"name": "wan", **SHAPE}
    model = build_model(model_cfg, attn, in_channels=3, text_dim=text_dim)
    x, t = torch.randn(B, 3, *video_shape), torch.rand(B)
    text, mask = torch.randn(B, L, text_dim), torch.ones(B, L, dtype=torch.bool)
    fwd = _counted(lambda: model(x, t, text, mask)) / B
    train = _counted(lambda: model(x, t, text, mask).square().mean().backward()) / B
    count = training_flops_per_sample(model_cfg, attn, in_channels=3, text_dim=text_dim, video_shape=video_shape,
                                      text_len=L)
    S, d = 4 * 4 * 4, 2 * 16
    tile_means = 0 if attn["name"] == "dense" else SHAPE["num_layers"] * 3 * 2 * S * d
    assert count.executed / 3 == fwd - tile_means
    assert count.executed == pytest.approx(train, rel=0.05)  # inputs need no grad: slightly under 3x forward
    assert (count.executed < count.dense) == (attn["name"] == "vsa")


def test_random_wan_has_the_configured_shape_and_follows_the_schedule(one_thread, capsys):
    cfg = _compose(*WAN, *VSA, "attn.schedule=ramp", "attn.ramp_rate=1.0", "attn.ramp_interval=1")
    spec = data_spec(cfg.data)
    model = build_model(cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim)
    config = model.transformer.config
    assert isinstance(model.transformer, VSAWanTransformer3DModel)
    assert {k: config[k] for k in SHAPE} == SHAPE and tuple(config.patch_size) == (1, 2, 2)
    assert (config.in_channels, config.out_channels, config.text_dim) == (3, 3, 64)
    assert len(model.blocks) == 2 and model.blocks is model.transformer.blocks  # what compile and FSDP wrap
    state = model.transformer._vsa_state
    schedule = SparsitySchedule(cfg.model, cfg.attn, spec)
    schedule.apply(0, model)  # a ramp from dense: all 8 tiles at step 0, the target 4 from step 1
    assert state.limit == 0.0 and state.topk((4, 4, 4)) == 8
    schedule.apply(1, model)
    assert state.limit == 1.0 and state.topk((4, 4, 4)) == 4
    # the dry run builds it on the meta device and prints what the trainer counts
    result = trainer.train(_compose(*WAN, *VSA, "train.dry_run=true"))
    out = capsys.readouterr().out
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert f"params: {result['params']}" in out and "flops_per_sample: " in out and "topk: 4 of 8 tiles" in out
    assert result["flops_per_sample"] < result["flops_per_sample_dense"]


def test_grad_checkpointing_full_gives_the_same_gradients(one_thread):
    grads = []
    for policy in ("none", "full"):
        torch.manual_seed(0)
        model = build_model({"name": "wan", **SHAPE, "grad_checkpointing": policy},
                            {"name": "vsa", "tile": [2, 2, 2], "sparsity": 0.5}, in_channels=3, text_dim=8)
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(2, 3, 4, 8, 8, generator=g), torch.rand(2, generator=g)
        text = torch.randn(2, 3, 8, generator=g)
        model(x, t, text).square().mean().backward()
        assert model.transformer.gradient_checkpointing == (policy == "full")
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


def test_finetuning_a_folder_trains_resumes_exactly_and_saves_gates(runs, folder):
    split, straight = _losses(runs / "split"), _losses(runs / "straight")
    assert list(split) == [1, 2, 3, 4] and split == straight  # resumed at step 2: the same steps exactly
    assert all(torch.isfinite(torch.tensor(v)) for v in split.values())
    evals = _losses(runs / "straight", "eval/loss")
    assert list(evals) == [0, 4] and evals[4] < evals[0]  # it learns
    weights = load_file(str(latest_checkpoint(runs / "straight") / "model.safetensors"))
    gates = [k for k in weights if ".attn1.vsa_gate_coarse." in k]
    assert sorted(gates) == sorted(f"transformer.blocks.{i}.attn1.vsa_gate_coarse.{p}" for i in range(2)
                                   for p in ("weight", "bias"))
    assert all(weights[k].abs().sum() > 0 for k in gates)  # zero at the start, trained since
    # the run started from the folder's weights (the gates were new)
    pretrained = WanTransformer3DModel.from_pretrained(folder).state_dict()
    cfg = _compose(*WAN, f"model.path={folder}", *VSA)
    start = build_model(cfg.model, cfg.attn, in_channels=3, text_dim=64).state_dict()
    assert all(torch.equal(start[f"transformer.{k}"], v) for k, v in pretrained.items())


def test_sampling_and_export(runs, tmp_path):
    model, cfg, _ = load_model(runs / "straight")  # EMA weights, the folder not read again
    videos = generate(model, cfg.data, ["a red circle"], steps=2, cfg_scale=3.0)
    assert videos.shape == (1, 3, 4, 8, 8) and videos.isfinite().all()
    with pytest.raises(MissingInput, match="on pixel data .* export the transformer alone"):  # no VAE: no pipeline
        export_run(runs / "straight", tmp_path / "pipe")
    out = export_run(runs / "straight", tmp_path / "out", transformer_only=True)
    assert json.loads((out / "vsa_train_export.json").read_text())["ema"] is True
    assert "VSAWanTransformer3DModel.from_pretrained" in (out / "README.md").read_text()  # its model card
    loaded = VSAWanTransformer3DModel.from_pretrained(out / "transformer").eval()
    x, t, text = torch.randn(1, 3, 4, 8, 8), torch.tensor([0.3]), torch.randn(1, 6, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 1000 * t, text).sample, model(x, t, text), rtol=0, atol=1e-6)


def test_init_from_a_dense_wan_run(tmp_path, folder, one_thread):
    _run(tmp_path / "dense", *WAN, f"model.path={folder}", *FAST, "train.max_steps=1")
    _run(tmp_path / "vsa", *WAN, *VSA, *FAST, "train.max_steps=1", f"train.init_from={tmp_path / 'dense'}")
    dense, vsa = (load_file(str(latest_checkpoint(tmp_path / n) / "model.safetensors")) for n in ("dense", "vsa"))
    assert set(vsa) - set(dense) == {k for k in vsa if "vsa_gate_coarse" in k} != set()


@pytest.mark.parametrize("overrides,line", [
    (["attn=vsa_fine_only"], "attn=vsa_fine_only (coarse=False"),
    (["attn=vsa", "attn.gate_fine=true"], "is not supported with model=wan: its processor is the VSA op"),
    (["attn=vsa", "attn.dense_layers=[0]"], "attn.dense_layers=[0] is not supported with model=wan"),
    (["parallel.sp_size=2"], "parallel.sp_size=2 is not supported with model=wan"),
    (["model.grad_checkpointing=selective"], "model.grad_checkpointing must be one of none, full for model=wan"),
    (["model.attention_head_dim=15"], "model.attention_head_dim must be even (rotary embedding), got 15"),
    (["+model.hidden_size=64"], "unknown key model.hidden_size; known: attention_head_dim,"),
    (["model.path=/nonexistent"], "model.path='/nonexistent': no config.json in /nonexistent"),
])
def test_bad_wan_configs_get_one_line(overrides, line):
    found = config_schema.problems(_compose(*WAN, *overrides))
    assert len(found) == 1 and line in found[0], found


def test_folder_checks(tmp_path):
    pipeline = tmp_path / "pipe"
    _save_wan(pipeline / "transformer", text_dim=32)
    (pipeline / "model_index.json").write_text("{}")
    found = config_schema.problems(_compose(*WAN, f"model.path={pipeline}"))
    assert found == [f"model.path='{pipeline}': no config.json in {pipeline} (a pipeline folder: set "
                     f"model.subfolder=transformer)"]
    found = config_schema.problems(_compose(*WAN, f"model.path={pipeline}", "model.subfolder=transformer"))
    assert len(found) == 1 and "takes 3 input channels and text of width 32; data=synthetic gives 3 and 64" in found[0]
    found = config_schema.problems(_compose(*WAN, f"model.path={pipeline}", "model.subfolder=transformer",
                                            "model.patch_size=[1,4,4]", "data.text_dim=32"))
    assert found == [f"model.patch_size=[1, 4, 4] differs from the patch size [1, 2, 2] of model.path={pipeline}: "
                     "set model.patch_size=[1, 2, 2]"]
    # the launch is refused before Hydra makes the run directory, with the same line
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *WAN, "attn=tile_window", "logger=none",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "attn=tile_window (coarse=False" in proc.stderr and not run_dir.exists()
