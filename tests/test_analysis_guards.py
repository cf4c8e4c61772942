"""Issue 26 part 5: the analysis tried as a new user would (seeds of different lengths, a whole messy runs/
folder, one-sided bounds, warm-started runs, a finished run resumed with a new budget). It refuses or flags
what it cannot compare, one line each, and never prints a multiplier whose direction contradicts its numbers."""
import json
import re

import numpy as np
from analysis_fakes import study_config, study_folder, study_rows, write_study_run
from omegaconf import OmegaConf
from test_analysis import true_loss, write_run

from vsa_train.analysis.__main__ import main
from vsa_train.analysis.report import analyze
from vsa_train.analysis.find import find_runs


def _curve(flops, ratio=1.0, offset=1.0):
    return [{"step": 0, "flops": 0.0, "eval/loss": 2.0}] + [
        {"step": i + 1, "flops": float(f), "eval/loss": float(true_loss(f, ratio) * offset)}
        for i, f in enumerate(flops)]


def _verdicts(out):
    return [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("**Verdict")]


def test_two_seeds_of_different_lengths_do_not_crash_the_bootstrap(tmp_path, capsys):
    """Constant learning rate: seed 1 stopped after 6 of seed 0's 10 evals. The bootstrap used to look up the
    longer seed's extra points in the mean over the shared ones (KeyError)."""
    flops = np.geomspace(1e15, 1e17, 10)
    write_run(tmp_path / "runs" / "dense_s0", "dense", depth=2, rows=_curve(flops), seed=0)
    write_run(tmp_path / "runs" / "dense_s1", "dense", depth=2, rows=_curve(flops[:6], offset=1.01), seed=1)
    write_run(tmp_path / "runs" / "vsa_s0", "vsa", depth=2, rows=_curve(flops, ratio=2.0), seed=0)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap", "100"]) == 0
    (verdict,) = _verdicts(tmp_path / "out")
    assert "VSA needs 2.0" in verdict and "fewer FLOPs than dense" in verdict
    assert "seeds cover different FLOPs" in capsys.readouterr().err


def test_a_whole_messy_runs_folder_is_analysed_with_one_line_per_exclusion(tmp_path, capsys):
    """runs/ holding a study, a multirun of another experiment (another eval set), a stray metrics.jsonl
    without a config, a config without attention, an empty run, a copy of a run and analysis outputs."""
    runs = tmp_path / "runs"
    study_folder(runs / "study_16k", sizes=("dit_60m", "dit_120m"))
    flops = np.geomspace(1e9, 1e10, 5)
    for attn in ("dense", "vsa"):  # data=synthetic (the CPU demo's eval set), not the study's synthetic_16k
        write_run(runs / "multirun" / "tiny" / f"attn={attn}", attn, depth=1, rows=_curve(flops),
                  configs=("config.yaml", ".hydra/config.yaml"))
    (runs / "stray").mkdir()
    (runs / "stray" / "metrics.jsonl").write_text('{"step": 0, "flops": 0.0}\n')
    (runs / "noattn").mkdir()
    (runs / "noattn" / "metrics.jsonl").write_text('{"step": 0, "flops": 0.0}\n')
    (runs / "noattn" / "config.yaml").write_text("model: {name: m, hidden_size: 8, depth: 1}\n")
    write_study_run(runs / "empty", study_config("dit_60m", "dense", 1e16), [])
    copy = runs / "study_16k" / "runs" / "dit_60m_dense_1e16"
    write_study_run(runs / "copy_of_60m", json.loads(json.dumps(study_config("dit_60m", "dense", 1e16))),
                    [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()])
    mismatch = study_rows("dit_120m", "vsa", 3e16)
    write_study_run(runs / "mismatch", study_config("dit_120m", "vsa", 3e16, seed=5), mismatch,
                    record={"executed_flops": 2 * mismatch[-1]["flops"]})
    diverged = study_rows("dit_60m", "vsa", 3e16)
    diverged[-1]["eval/loss"] = float("nan")
    write_study_run(runs / "diverged", study_config("dit_60m", "vsa", 3e16, seed=7), diverged)
    (runs / "foreign").mkdir()  # another tool's metrics.jsonl: steps, no FLOPs
    (runs / "foreign" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    OmegaConf.save(OmegaConf.create(study_config("dit_60m", "dense", 1e16)), runs / "foreign" / "config.yaml")
    (runs / "analysis").mkdir()
    (runs / "analysis" / "summary.md").write_text("# an earlier analysis\n")
    (runs / "analysis" / "frontier.png").write_bytes(b"\x89PNG")
    assert main([str(runs), "--out", str(tmp_path / "out"), "--bootstrap", "50"]) == 0
    err = capsys.readouterr().err
    for name in ("stray", "noattn", "empty", "copy_of_60m", "attn=dense", "diverged", "foreign", "mismatch"):
        assert len([line for line in err.splitlines() if name in line]) == 1, (name, err)
    assert len(_verdicts(tmp_path / "out")) >= 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "another eval set" in summary and "tiny" not in summary.split("## Notes")[0]


def test_a_folder_whose_every_run_is_left_out_still_gets_a_summary(tmp_path, capsys):
    rows = study_rows("dit_60m", "vsa", 1e16)
    rows[-1]["eval/loss"] = float("nan")
    write_study_run(tmp_path / "runs" / "nan", study_config("dit_60m", "vsa", 1e16), rows)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap", "10"]) == 0
    assert "nan: its last eval loss is nan (diverged?); left out" in capsys.readouterr().err
    assert "0 runs analysed" in (tmp_path / "out" / "summary.md").read_text()


def _final_only(root, attn, budget, loss, seed=0):
    rows = [{"step": 0, "flops": 0.0, "eval/loss": 2.0}, {"step": 9, "flops": budget, "eval/loss": loss}]
    write_run(root / f"{attn}_{budget:g}_s{seed}", attn, depth=2, rows=rows, budget=budget, schedule="cosine",
              seed=seed)


def test_a_bound_that_does_not_tell_the_direction_is_not_printed_as_one(tmp_path):
    """Two dense seeds at 3.39e15 beat the one VSA run (1e15): dense reaches VSA's loss with at most 3.39x VSA's
    FLOPs. That bounds the multiplier by 3.39 from above but says nothing about who needs fewer; it used to
    print 'vsa needs at least 0.29x more FLOPs' beside a note 'upper bound 3.39x'."""
    for seed, loss in ((0, 0.50), (1, 0.51)):
        _final_only(tmp_path / "runs", "dense", 3.39e15, loss, seed)
    _final_only(tmp_path / "runs", "vsa", 1e15, 0.9)
    analyze(find_runs([tmp_path / "runs"]), tmp_path / "out", resamples=50)
    summary = (tmp_path / "out" / "summary.md").read_text()
    (verdict,) = _verdicts(tmp_path / "out")
    assert "0.29" not in summary and "at least" not in verdict
    assert "cannot tell" in verdict and "3.39" in verdict


def test_a_bound_that_tells_the_direction_reads_the_right_way_round(tmp_path):
    _final_only(tmp_path / "runs", "dense", 1e15, 0.5)
    _final_only(tmp_path / "runs", "vsa", 3e15, 0.9)
    analyze(find_runs([tmp_path / "runs"]), tmp_path / "out", resamples=50)
    (verdict,) = _verdicts(tmp_path / "out")
    assert "VSA needs at least 3.00× more FLOPs than dense" in verdict


def _numbers_agree(verdict):
    """The direction word of a verdict against its multiplier and interval (all >= 1 in that direction)."""
    m = re.search(r"needs ([\d.]+)× (fewer|more) FLOPs.*?\[([\d.]+), ([\d.]+)\]", verdict)
    value, low, high = float(m.group(1)), float(m.group(3)), float(m.group(4))
    return value >= 1 and low <= value <= high


def test_warm_started_runs_are_excluded_unless_they_record_inherited_flops(tmp_path, capsys):
    """README's ramp example: VSA started from a finished dense run's weights (train.init_from) counts its FLOPs
    from 0, so it looked 14x cheaper. Without inherited FLOPs in its files it is left out, with a note."""
    flops = np.geomspace(1e15, 1e17, 10)
    write_run(tmp_path / "runs" / "dense", "dense", depth=2, rows=_curve(flops))
    warm = [{"step": 0, "flops": 0.0, "eval/loss": float(true_loss(1e17))}] + [
        {"step": i + 1, "flops": float(f), "eval/loss": float(true_loss(1e17 + f))} for i, f in enumerate(flops)]
    write_run(tmp_path / "runs" / "vsa_ramp", "vsa", depth=2, rows=warm)
    cfg_path = tmp_path / "runs" / "vsa_ramp" / ".hydra" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("train:", "train:\n  init_from: runs/dense"))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap", "0"]) == 0
    err = capsys.readouterr().err
    assert "vsa_ramp: started from other weights (train.init_from=runs/dense)" in err
    assert not _verdicts(tmp_path / "out") or "fewer" not in _verdicts(tmp_path / "out")[0]
    (tmp_path / "runs" / "vsa_ramp" / "record.json").write_text(json.dumps({"inherited_flops": 1e17}))
    (run,) = [r for r in find_runs([tmp_path / "runs"]) if r.attn == "vsa"]
    result = analyze([*find_runs([tmp_path / "runs" / "dense"]), run], tmp_path / "out2", resamples=0)
    shifted = {f for f, _ in result["frontiers"]["vsa"]}  # counted from the dense run's 1e17
    assert shifted and shifted <= {1e17 + f for f in flops}


def _rebudgeted(run_dir, floor_at_budget=True):
    """A tiny dense run finished at its budget (1.2e9, step 4, lr at the floor, eval), then relaunched in the
    same directory with train.flops_budget=1.5e10: config.yaml keeps 1.2e9, the rows go on to 1.5e10."""
    step = 3.0e8
    rows = []
    for s in range(0, 51):
        lr = 6e-4 if s < 4 else (6e-5 if s == 4 and floor_at_budget else 5e-4 * (1 - s / 60))
        row = {"step": s, "flops": s * step, "lr": lr, "loss": 1.0}
        if s % 4 == 0:
            row["eval/loss"] = 1.3 - 0.005 * s
        rows.append(row)
    cfg = study_config("dit_60m", "dense", 1.2e9)
    history = [{"resumed_from": None, "changed": {}, "forced": False},
               {"resumed_from": "step_00000004", "changed": {}, "forced": False}]
    write_study_run(run_dir, cfg, rows, history=history)


def test_a_finished_run_resumed_with_a_new_budget_is_cut_at_its_own_budget(tmp_path, capsys):
    _rebudgeted(tmp_path / "runs" / "budget")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap", "0"]) == 0
    err = capsys.readouterr().err
    assert "budget: went on past its budget 1.2e+09 to 1.5e+10" in err and "analysed up to step 4" in err
    (run,) = find_runs([tmp_path / "runs"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "1.28e+03%" not in summary and "+0.0%" in summary  # reached its own budget, no overshoot reported
    assert run.rows[-1]["step"] == 50  # reading alone does not cut: the analysis does, and says so


def test_a_run_whose_budget_changed_before_it_finished_is_excluded(tmp_path, capsys):
    _rebudgeted(tmp_path / "runs" / "budget", floor_at_budget=False)
    write_study_run(tmp_path / "runs" / "other", study_config("dit_120m", "dense", 1.2e9),
                    study_rows("dit_120m", "dense", 1.2e9))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap", "0"]) == 0
    err = capsys.readouterr().err
    assert "budget: went on past its budget 1.2e+09" in err and "left out" in err
