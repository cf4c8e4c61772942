"""vsa_train.bench.gaps: GPU idle gaps in a Chrome trace, charged to the host op that launched the next kernel."""
import gzip
import json
import pytest

from vsa_train.bench import gaps as idle_gaps


def X(cat, name, ts, dur, tid=1, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def _trace():
    """Host: a forward (0-100) launching k1, k2; an optimizer step (150-400) that syncs, then launches k3.
    Device: k1 10-60, k2 on another stream 50-80 (overlap), k3 at 420 (launched at 405: host-bound gap 80-420),
    k4 at 500 launched at 300 (before the GPU ran dry at 460: a dependency gap of 40)."""
    return {"traceEvents": [
        X("cpu_op", "forward", 0, 100), X("cpu_op", "aten::mm", 5, 10),
        X("cuda_runtime", "cudaLaunchKernel", 6, 2, corr=1), X("cuda_driver", "cuLaunchKernelEx", 40, 2, corr=2),
        X("user_annotation", "Optimizer.step#AdamW.step", 150, 300), X("cpu_op", "aten::_fused_adamw_", 402, 10),
        X("cuda_runtime", "cudaLaunchKernel", 405, 2, corr=3), X("cuda_runtime", "cudaLaunchKernel", 300, 2, corr=4),
        X("kernel", "k1", 10, 50, corr=1), X("kernel", "k2", 50, 30, corr=2),
        X("kernel", "k3", 420, 40, corr=3), X("gpu_memcpy", "k4", 500, 5, corr=4),
        X("gpu_user_annotation", "ignored", 0, 1000),  # not device work: must not fill the gaps
        {"ph": "i", "name": "an instant event", "ts": 1},
    ]}


def test_gaps_busy_time_and_causes():
    r = idle_gaps.idle_gaps(_trace(), min_us=20)
    assert r["span_us"] == pytest.approx(505 - 10)
    assert r["busy_us"] == pytest.approx(70 + 40 + 5)  # k1 ∪ k2 = 10-80, k3, k4
    host, dep = r["gaps"]
    assert host["us"] == pytest.approx(340) and host["cause"] == "host" and host["kernel"] == "k3"
    assert host["stack"] == ["Optimizer.step#AdamW.step", "aten::_fused_adamw_"]
    assert host["at_us"] == pytest.approx(80 - 10)
    assert dep["us"] == pytest.approx(40) and dep["cause"] == "dependency"
    assert dep["stack"] == ["Optimizer.step#AdamW.step"]
    assert [g["kernel"] for g in idle_gaps.idle_gaps(_trace(), min_us=100)["gaps"]] == ["k3"]


def test_report_and_gzipped_file(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    text = idle_gaps.report(idle_gaps.idle_gaps(idle_gaps.load(str(path))))
    assert "idle 0.38 ms" in text and "0.34 ms of it host-bound" in text
    assert "| `aten::_fused_adamw_` | host | 1 | 0.34 |" in text
    assert "| `Optimizer.step#AdamW.step` | dependency | 1 | 0.04 |" in text


def test_no_device_work_and_bad_files(tmp_path):
    empty = idle_gaps.idle_gaps({"traceEvents": [X("cpu_op", "a", 0, 5)]})
    assert empty == {"span_us": 0.0, "busy_us": 0.0, "gaps": []}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a Chrome trace"):
        idle_gaps.load(str(bad))
    torn = tmp_path / "torn.json"
    torn.write_text('{"traceEvents": [')
    with pytest.raises(json.JSONDecodeError):
        idle_gaps.load(str(torn))
