"""The ledger-driven grid runner (vsa_train/grid): the study's grid expands as its experiment says, finished runs
land in the ledger with their record, unfinished, failed, cut or hostile ones never do, and estimates come from the
records."""
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vsa_train.grid import ledger, runner
from vsa_train.grid.__main__ import main as grid_main
from vsa_train.grid.ledger import Estimate, Point

ROOT = Path(__file__).resolve().parents[1]
# The study's grid at CPU size: one layer of width 64, 256 tokens, budgets a few steps long (overridden for all).
TINY = ["model.hidden_size=64", "model.depth=1", "model.num_heads=1", "data.frames=4", "data.height=16",
        "data.width=16", "data.num_workers=0", "train.batch_size=2", "train.eval_samples=2", "train.eval_timesteps=2",
        "train.eval_batch_size=2", "train.flops_budget=3e9", "train.eval_every_flops=1.5e9"]


def test_study_grid_is_3_sizes_x_2_attentions_x_3_budgets_and_a_second_seed():
    points = ledger.grid_points("study_16k", ROOT / "configs")
    assert len(points) == 24 and len({p.name for p in points}) == 24
    assert {p.group for p in points} == {f"dit_{s}_{a}" for s in ("60m", "120m", "410m") for a in ("dense", "vsa")}
    budgets = sorted({p.budget for p in points})
    assert budgets == [1e16, 3e16, 1e17] and budgets[-1] / budgets[0] >= 10
    for group in {p.group for p in points}:  # per (size, attention): 3 budgets + one more seed
        assert sorted(p.budget for p in points if p.group == group) == [1e16, 1e16, 3e16, 1e17]
    assert "dit_410m_vsa_low_s1" in {p.name for p in points}


def test_study_points_compose_as_the_paper_recipe_with_a_cosine_to_each_budget():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=["experiment=study_16k", "model=dit_410m", "attn=vsa", "point=low_s1"])
    assert (cfg.data.frames, cfg.data.height, cfg.data.width) == (16, 64, 64)  # 16,384 tokens
    assert cfg.train.seed == 1 and cfg.train.flops_budget == 1e16 and cfg.optim.schedule == "cosine"
    assert cfg.optim.lr == 6e-4 and list(cfg.optim.betas) == [0.9, 0.95] and cfg.attn.sparsity == 0.875
    assert cfg.model.grad_checkpointing == "selective"  # fits an 80 GB card


def _args(tmp_path, **kw):
    base = dict(experiment="study_16k", results=str(tmp_path / "results"), work=str(tmp_path / "work"), time=300.0,
                lanes=2, memory_gib=None, safety=runner.SAFETY, archive=str(tmp_path / "runs.tgz"),
                only=["dit_60m_dense_low*"], extra=TINY, configs=ROOT / "configs")
    return SimpleNamespace(**{**base, **kw})


def test_runs_two_lanes_keeps_finished_runs_and_skips_them_next_time(tmp_path):
    args = _args(tmp_path)
    points = ledger.grid_points(args.experiment, args.configs, args.extra)
    lines = []
    assert runner.run(points, args, lines.append) == 0
    results = Path(args.results)
    for name in ("dit_60m_dense_low", "dit_60m_dense_low_s1"):
        record = ledger.read_record(results, name)
        assert record["finished"] and record["card"] and record["commit"] and record["wall_s"] > 0
        assert record["executed_flops"] >= 3e9 and record["lanes"] in (1, 2)
        rows = [json.loads(line) for line in (results / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["flops"] == record["executed_flops"] and rows[-1]["eval/loss"] == record["final_eval_loss"]
        assert (results / "runs" / name / "config.yaml").exists()
        assert "[" in (Path(args.work) / f"{name}.out").read_text()  # timestamped log lines
    with tarfile.open(args.archive) as tar:
        assert {"runs/dit_60m_dense_low/record.json", "runs/dit_60m_dense_low_s1/metrics.jsonl"} <= set(tar.getnames())
    seeds = {ledger.read_record(results, n)["final_eval_loss"] for n in ("dit_60m_dense_low", "dit_60m_dense_low_s1")}
    assert len(seeds) == 2  # the second seed is another run, not a copy
    again = []
    assert runner.run(points, args, again.append) == 0
    assert not any(": started" in line for line in again)  # finished runs are never run again
    table = ledger.status(points, results)
    assert "2 of 24 runs done" in table and "| dit_60m_dense_low | 3e+09 | done" in table


def test_a_failing_run_is_reported_and_not_kept(tmp_path):
    args = _args(tmp_path, only=["dit_60m_vsa_low"], extra=[*TINY, "optim.lr=-1"], lanes=1)
    points = ledger.grid_points(args.experiment, args.configs, [a for a in args.extra if "optim.lr" not in a])
    lines = []
    assert runner.run(points, args, lines.append) == 1
    assert any("dit_60m_vsa_low: NOT kept" in line for line in lines)
    assert not (Path(args.results) / "runs" / "dit_60m_vsa_low").exists()


def test_a_run_cut_at_the_deadline_is_discarded(tmp_path, monkeypatch):
    args = _args(tmp_path, time=1.0, lanes=1, only=["dit_60m_dense_mid"])  # less than python and torch take to start
    points = ledger.grid_points(args.experiment, args.configs, args.extra)
    quick = Estimate(0.0, 0.0, 1.0)  # pretend it fits, so that the deadline must cut it
    lines = []
    monkeypatch.setattr(runner, "estimate", lambda point, speeds: quick)
    assert runner.run(points, args, lines.append) == 0  # a cut is not a failure of the code
    assert any("cut at the deadline" in line for line in lines), lines
    assert ledger.read_record(Path(args.results), "dit_60m_dense_mid") is None


def _rows(budget, final_flops, final_eval=True):
    rows = [{"step": 0, "flops": 0.0, "eval/loss": 1.5}]
    rows.append({"step": 10, "flops": final_flops, "samples": 40, "samples/s": 4.0, "mem/peak_GiB": 3.0,
                 **({"eval/loss": 0.5} if final_eval else {})})
    return rows


@pytest.mark.parametrize("final_flops, final_eval, why", [
    (0.99e12, True, "short of its budget"), (1.03e12, True, "overshot"), (1.0e12, False, "no eval at its last step")])
def test_unfinished_runs_are_refused(tmp_path, final_flops, final_eval, why):
    point = Point("p", ("point=low",), "g", 1e12)
    (tmp_path / "config.yaml").write_text("{}")
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for row in _rows(1e12, final_flops, final_eval):
            f.write(json.dumps(row) + "\n")
    assert why in runner.check_finished(point, tmp_path)[1]


@pytest.mark.parametrize("content", ["", "{\"finished\": tr", "[1, 2]", "{\"finished\": false}",
                                     "cos\nsystem\n(S'echo pwned'\ntR."])
def test_torn_or_hostile_records_count_as_not_done(tmp_path, content):
    run = tmp_path / "runs" / "p"
    run.mkdir(parents=True)
    (run / "record.json").write_text(content)
    assert ledger.read_record(tmp_path, "p") is None


def test_estimates_come_from_the_group_records(tmp_path):
    points = [Point("a", (), "dit_60m_vsa", 1e12), Point("b", (), "dit_60m_vsa", 1e13), Point("c", (), "x_dense", 1e13)]
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    rows = [{"step": 0, "flops": 0.0}, {"step": 5, "flops": 5e11, "samples": 50, "samples/s": 99.0},
            {"step": 10, "flops": 1e12, "samples": 100, "samples/s": 10.0, "mem/peak_GiB": 7.0},
            {"step": 11, "flops": 1e12, "samples": 100, "samples/s": 10.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "record.json").write_text(json.dumps({"finished": True, "wall_s": 30.0, "executed_flops": 1e12,
                                                 "lanes": 1, "commit": "c", "card": "k", "final_eval_loss": 0.5}))
    speeds = ledger.group_speeds(points, tmp_path)
    est = ledger.estimate(points[1], speeds)  # 1e10 FLOPs per sample at 10 samples/s (the first window dropped)
    assert est.train_s == pytest.approx(1e13 / 1e11) and est.overhead_s == pytest.approx(20.0)
    assert est.peak_gib == 7.0
    assert ledger.estimate(points[2], speeds).train_s == pytest.approx(1e13 / (ledger.DEFAULT_TFLOPS["dense"] * 1e12))
    assert ledger.group_speeds(points, tmp_path, card="other")["dit_60m_vsa"] == speeds["dit_60m_vsa"]  # no record of its own
    other = tmp_path / "runs" / "b"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps({**r, **({"samples/s": 2 * r["samples/s"]} if "samples/s" in r else {})}) + "\n" for r in rows))
    (other / "record.json").write_text(json.dumps({"finished": True, "wall_s": 20.0, "executed_flops": 1e12, "lanes": 1,
                                                   "commit": "c", "card": "fast", "final_eval_loss": 0.5}))
    assert ledger.group_speeds(points, tmp_path)["dit_60m_vsa"]["flops_s"] == pytest.approx(1e11)  # the slowest card
    assert ledger.group_speeds(points, tmp_path, card="fast")["dit_60m_vsa"]["flops_s"] == pytest.approx(2e11)


def test_lanes_share_memory_and_the_gpu():
    running = [runner.Active(Point("r", (), "g", 1.0), proc=None, est=Estimate(10.0, 100.0, 40.0))]
    assert runner.fits(Estimate(10.0, 50.0, 20.0), [], 66.0, 80.0) and not runner.fits(Estimate(10.0, 50.0, 20.0), [], 65.0, 80.0)
    assert not runner.fits(Estimate(10.0, 50.0, 50.0), running, 1000.0, 80.0)   # 40 + 50 GiB > 80
    # both overheads side by side (10 s), then the GPU halved: the new one ends at 110 s, the running one at 160 s
    assert runner.end_times([[10.0, 100.0], [10.0, 50.0]]) == pytest.approx([160.0, 110.0])
    assert not runner.fits(Estimate(10.0, 50.0, 20.0), running, 175.0, 80.0)
    assert runner.fits(Estimate(10.0, 50.0, 20.0), running, 177.0, 80.0)
    assert runner.fits(Estimate(10.0, 50.0, 20.0), running, 161.0, 80.0, safety=1.0)  # --safety 1: no margin


def test_advance_tracks_what_is_left():
    work = [[5.0, 100.0], [0.0, 40.0], [0.0, 0.0]]
    runner.advance(work, 10.0)  # 5 s: the first in its overhead, the second alone on the GPU; then 5 s shared
    assert work == [[0.0, 97.5], [0.0, 32.5], [0.0, 0.0]]
    runner.advance(work, 20.0)  # both train: 10 s of solo progress each
    assert work == [[0.0, 87.5], [0.0, 22.5], [0.0, 0.0]]
    assert runner.end_times(work) == pytest.approx([110.0, 45.0, 0.0])
    runner.advance(work, 1000.0)  # past every end: nothing left, nothing negative
    assert work == [[0.0, 0.0]] * 3


def test_plan_plays_the_runners_choices_call_by_call():
    from vsa_train.grid.plan import one_call, plan

    points = [Point(name, (), name, 1.0) for name in ("long", "short", "mid", "huge")]
    speeds = {"long": {"flops_s": 1 / 400, "overhead_s": 90.0, "peak_gib": 30.0},   # 490 s alone
              "short": {"flops_s": 1 / 50, "overhead_s": 90.0, "peak_gib": 30.0},   # 140 s
              "mid": {"flops_s": 1 / 150, "overhead_s": 90.0, "peak_gib": 50.0},    # 240 s, too big beside long
              "huge": {"flops_s": 1 / 600, "overhead_s": 90.0, "peak_gib": 30.0}}   # 690 s: no call of 555 s
    todo = list(points)
    call = one_call(todo, speeds, 600.0, 2, 72.0)
    # long first (the longest that fits); short beside it: overheads overlap, then 50 s of shared training; mid
    # would end in time after short, but not beside long in 72 GiB
    assert [(name, round(start), round(end)) for start, end, name in call.runs] == [("short", 0, 190),
                                                                                   ("long", 0, 540)]
    assert [p.name for p in todo] == ["mid", "huge"]
    assert one_call(list(points), speeds, 555.0, 2, 72.0).runs == [(0.0, 490.0, "long")]  # 540 s x 1.1 > 555 s
    text = plan(points, ROOT / "no_results", speeds, 600.0, 2, 72.0)
    assert "2 calls of 600 s" in text and "no call fits: huge (~690 s alone): longer than a call of 600 s" in text
    tight = plan([Point("long", (), "long", 1.0)], ROOT / "no_results", speeds, 500.0, 1, 72.0)
    assert "long (~490 s alone): alone in a call at --safety 1.020 or less" in tight  # 500 / 490 = 1.0204


def test_cli_status_and_bad_lanes(tmp_path, capsys):
    assert grid_main(["status", "study_16k", str(tmp_path)]) == 0
    assert "0 of 24 runs done" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        grid_main(["run", "study_16k", str(tmp_path), "--lanes", "0"])
    with pytest.raises(SystemExit):
        grid_main(["run", "study_16k", str(tmp_path), "--safety", "0.9"])
    out = subprocess.run([sys.executable, "-m", "vsa_train.grid", "status", "no_such_experiment", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0


def test_the_gpu_script_returns_the_runs_and_their_logs(tmp_path):
    """scripts/gpu/grid.sh on the CPU: what a device call brings back (runs.tgz, logs.tgz, grid.log) is all there."""
    env = {**__import__("os").environ, "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
           "WORK": str(tmp_path / "work"), "CACHE": str(tmp_path / "cache"), "ONLY": "dit_60m_dense_low", "TIME": "300",
           "EXTRA": " ".join([*TINY, "train.compile=false"])}
    subprocess.run(["bash", "scripts/gpu/grid.sh"], cwd=ROOT, env=env, check=True, capture_output=True)
    with tarfile.open(tmp_path / "out" / "runs.tgz") as tar:
        assert "runs/dit_60m_dense_low/record.json" in tar.getnames()
    with tarfile.open(tmp_path / "out" / "logs.tgz") as tar:
        assert tar.getnames() == ["./dit_60m_dense_low.out"]
    assert "1 runs finished here" in (tmp_path / "out" / "grid.log").read_text()
    # CALL_END: the runner gets what is left of the call, less 15 s for the tarballs (a finished ledger: nothing runs)
    env = {**env, "OUT": str(tmp_path / "out2"), "CALL_END": str(int(time.time()) + 200)}
    del env["TIME"]
    subprocess.run(["bash", "scripts/gpu/grid.sh"], cwd=ROOT, env=env, check=True, capture_output=True)
    seconds = int(re.search(r"at once in \S+ GiB, (\d+) s", (tmp_path / "out2" / "grid.log").read_text()).group(1))
    assert 170 <= seconds <= 185


def test_a_shared_run_does_not_slow_its_groups_estimate(tmp_path):
    """Two runs that shared the GPU log half the rate; the group's estimate keeps its solo run's rate."""
    points = [Point("solo", (), "g_vsa", 1e12), Point("shared", (), "g_vsa", 1e12), Point("next", (), "g_vsa", 1e13)]
    for name, samples_s, lanes in (("solo", 10.0, 1), ("shared", 5.0, 2)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        rows = [{"step": s, "flops": 1e11 * s, "samples": 10 * s, "samples/s": samples_s} for s in range(1, 11)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "record.json").write_text(json.dumps({"finished": True, "wall_s": 60.0, "executed_flops": 1e12,
                                                     "lanes": lanes}))
    speeds = ledger.group_speeds(points, tmp_path)
    assert speeds["g_vsa"]["flops_s"] == pytest.approx(1e11)  # 1e10 FLOPs a sample x 10 samples/s
    assert speeds["g_vsa"]["overhead_s"] == pytest.approx(50.0)  # from the solo run only
