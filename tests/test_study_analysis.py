"""The analysis of a study laid out as docs/study/study_16k/runs (3 sizes x dense/VSA x 3 budgets with cosine
decays, a second seed at the lowest budget; metrics.jsonl, config.yaml, record.json per run), on fake runs whose
FLOPs multiplier is known: the verdict lines (all sizes, the largest size alone), the isoFLOP optima and their
flags, the per-timestep view, and outputs that are the same byte for byte on every run of the analysis."""
import re
from pathlib import Path

import pytest
from analysis_fakes import POINTS, study_folder
from test_analysis_guards import _numbers_agree

from vsa_train.analysis.__main__ import main
from vsa_train.analysis.report import analyze
from vsa_train.analysis.find import find_runs
from vsa_train.analysis.screen import overshoot
from vsa_train.metrics import BUDGET_OVERSHOOT

STUDY = Path(__file__).resolve().parents[1] / "docs" / "study" / "study_16k"  # the GPU study's committed runs

OUTPUTS = {"summary.md", "curves.png", "frontier.png", "isoflop.png", "frontier_t.png", "sizes.png"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The fake 24-run study (VSA 2.5x cheaper at equal loss) and its analysis, made once for this module."""
    root = tmp_path_factory.mktemp("study")
    runs = study_folder(root, ratio=2.5)
    result = analyze(find_runs([runs]), root / "out", resamples=300)
    return runs, root / "out", result


def test_the_multiplier_is_recovered_overall_and_at_410m(study):
    _, out, result = study
    overall, at_410m = result["multipliers"]["vsa"], result["per_size"]["vsa"]["dit_410m (1024x24)"]
    for m in (overall, at_410m):
        low, high, _ = m["ci"]
        assert m["ratio"] == pytest.approx(2.5, rel=0.05) and 1 < low < 2.5 < high
    assert set(result["per_size"]["vsa"]) == {"dit_60m (512x14)", "dit_120m (768x12)", "dit_410m (1024x24)"}
    verdicts = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("**Verdict")]
    assert [v.split(":**")[0] for v in verdicts] == ["**Verdict (all sizes)", "**Verdict (dit_410m (1024x24) alone)"]
    for line in verdicts:
        assert re.search(r"VSA needs [\d.]+× fewer FLOPs than dense for the same eval loss \(95% interval "
                         r"\[[\d.]+, [\d.]+\]; it excludes 1\)", line) and _numbers_agree(line)
    assert {p.name for p in out.iterdir()} == OUTPUTS


def test_isoflop_optima_are_given_and_flagged_outside_the_sizes(tmp_path):
    points = {"3e15": (3e15, 0), "1e16": (1e16, 0), "1e18": (1e18, 0), "1e16_s1": (1e16, 1)}
    runs = study_folder(tmp_path, points=points)
    result = analyze(find_runs([runs]), tmp_path / "out", resamples=0)
    parabolas = result["isoflop"]["parabolas"]
    assert parabolas["dense", 1e16].inside and 61e6 < parabolas["dense", 1e16].params_opt < 412e6
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| dense | 3e+15 |" in summary and "**optimum below the smallest size run: an extrapolation**" in summary
    assert "**optimum above the largest size run: an extrapolation**" in summary
    assert "isoFLOP dense at 3e+15 FLOPs: optimum below the smallest size run" in summary


def test_per_timestep_view_has_a_multiplier_and_losses_per_bin(study):
    _, out, result = study
    rows = result["per_t"]["rows"]
    assert [r["t"] for r in rows] == [0.125, 0.375, 0.625, 0.875]
    assert all(r["ratio"] == pytest.approx(2.5, rel=0.05) for r in rows)
    summary = (out / "summary.md").read_text()
    table = summary.split("final eval loss per timestep bin")[1]
    assert "| dit_410m (1024x24) | 1e+17 | " in table and table.count("\n| dit_") == 9  # 3 sizes x 3 budgets


def test_the_outputs_are_reproducible_byte_for_byte(study, tmp_path):
    runs, out, _ = study
    assert main([str(runs), "--out", str(tmp_path / "again"), "--bootstrap", "300"]) == 0
    for name in OUTPUTS:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize("ratio, words", [(0.5, "more"), (1.0, "includes 1")])
def test_the_verdict_follows_the_numbers_when_vsa_is_worse_or_even(tmp_path, ratio, words):
    runs = study_folder(tmp_path, ratio=ratio, noise=0.01, points=POINTS)
    result = analyze(find_runs([runs]), tmp_path / "out", resamples=200)
    (verdict, _) = [line for line in (tmp_path / "out" / "summary.md").read_text().splitlines()
                    if line.startswith("**Verdict")]
    assert words in verdict and _numbers_agree(verdict)
    m = result["multipliers"]["vsa"]
    if ratio < 1:
        assert m["ratio"] == pytest.approx(ratio, rel=0.1) and m["ci"][1] < 1
        assert f"VSA needs {1 / m['ratio']:.2f}× more FLOPs than dense" in verdict
    else:
        assert m["ci"][0] < 1 < m["ci"][1]


@pytest.mark.skipif(not (STUDY / "runs").is_dir(), reason="docs/study/study_16k/runs is not committed yet")
def test_the_committed_study_is_analysed_from_its_files_alone(tmp_path):
    """The committed runs: each with its record, at its budget within +2%; the analysis runs on a CPU from these
    files alone, its verdicts agree with their numbers, and a committed summary.md is what these files give."""
    for run in find_runs([STUDY / "runs"]):
        assert run.record and run.reached_budget and overshoot(run) <= BUDGET_OVERSHOOT, run.path.name
    assert main([str(STUDY / "runs"), "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    verdicts = [line for line in summary.splitlines() if line.startswith("**Verdict")]
    assert verdicts and all(_numbers_agree(v) for v in verdicts if "95% interval" in v)
    if (STUDY / "summary.md").is_file():
        assert summary == (STUDY / "summary.md").read_text(), "summary.md is stale: rerun the analysis"
