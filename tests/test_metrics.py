"""metrics.jsonl survives crashes and junk: tolerant reading, atomic rewind at resume, full-disk errors."""
import errno
import json
import os
import warnings
from types import SimpleNamespace

import pytest

from vsa_train import files, metrics
from vsa_train.metrics import MetricsLog, MetricsWarning, read_metrics, rewind

ROWS = [{"step": i, "flops": i * 1e12, "train/loss": 1.0 / (i + 1)} for i in range(4)]


def lines(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class FakeAccelerator:
    """What MetricsLog uses of an accelerate.Accelerator: is_main_process and log (recorded here)."""

    def __init__(self, is_main_process=True):
        self.is_main_process, self.logged = is_main_process, []

    def log(self, row, step):
        self.logged.append((step, row))


def read_warned(path):
    """(rows, warning messages) of read_metrics."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = read_metrics(path)
    assert all(issubclass(w.category, MetricsWarning) for w in caught)
    return rows, [str(w.message) for w in caught]


def test_clean_file_reads_without_warnings(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(ROWS) + b"\n  \n")  # blank lines are not junk
    assert read_warned(path) == (ROWS, [])
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("tail", [b'{"step": 4, "flo', b'{"step": 4}'])
def test_torn_last_line_is_dropped_with_a_warning(tmp_path, tail):
    """A last line without its newline is a write cut short (SIGKILL): dropped, even where it happens to parse."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(ROWS) + tail)
    rows, warned = read_warned(path)
    assert rows == ROWS
    assert len(warned) == 1 and f"{path}:5:" in warned[0] and "torn last line" in warned[0]


@pytest.mark.parametrize("junk, why", [
    (b"not json at all", "not JSON"),
    (b'{"step": 1, "loss": ', "not JSON"),
    (b"\xff\xfe{\"step\": 9}", "not UTF-8"),
    (b"[1, 2, 3]", "a JSON list, not an object"),
    (b'"step"', "a JSON str, not an object"),
    (b'{"flops": 3.0}', "no integer 'step'"),
    (b'{"step": "7"}', "no integer 'step'"),
    (b'{"step": 2.0}', "no integer 'step'"),
    (b'{"step": true}', "no integer 'step'"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_junk_line_is_reported_with_its_line_number_and_skipped(tmp_path, junk, why):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(ROWS[:2]) + junk + b"\n" + lines(ROWS[2:]))
    rows, warned = read_warned(path)
    assert rows == ROWS
    assert len(warned) == 1 and warned[0].startswith(f"{path}:3: skipped a bad line") and why in warned[0]


def test_every_bad_line_is_reported(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"junk\n" + lines(ROWS[:1]) + b"\xc3\x28\n" + lines(ROWS[1:]) + b'{"st')
    rows, warned = read_warned(path)
    assert rows == ROWS
    assert [w.split(": ")[0] for w in warned] == [f"{path}:1", f"{path}:3", f"{path}:7"]


def test_resume_keeps_rows_up_to_the_checkpoint_and_drops_junk(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(ROWS[:2]) + b"garbage\n" + lines(ROWS[2:]) + b'{"step": 4, "fl')
    os.chmod(path, 0o644)
    accelerator = FakeAccelerator()
    with pytest.warns(MetricsWarning) as caught:
        log = MetricsLog(path, accelerator, resume_step=2)
    assert [str(w.message).split(": ")[0] for w in caught] == [f"{path}:3", f"{path}:6"]
    assert path.read_bytes() == lines(ROWS[:3])
    assert path.stat().st_mode & 0o777 == 0o644  # the rewrite keeps the file readable by others
    log.log({"step": 3, "flops": 5.0})
    assert read_metrics(path) == ROWS[:3] + [{"step": 3, "flops": 5.0}]
    assert accelerator.logged == [(3, {"step": 3, "flops": 5.0})]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind


def test_fresh_run_empties_the_file_and_other_ranks_leave_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(ROWS))
    MetricsLog(path, FakeAccelerator(is_main_process=False), resume_step=-1)
    assert path.read_bytes() == lines(ROWS)
    MetricsLog(path, FakeAccelerator(), resume_step=-1)
    assert path.read_bytes() == b""
    MetricsLog(tmp_path / "new.jsonl", FakeAccelerator(), resume_step=5)  # no file yet: nothing to rewind
    assert not (tmp_path / "new.jsonl").exists()


def test_rewind_leaves_an_intact_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(ROWS))
    monkeypatch.setattr(files.os, "replace", lambda *a: pytest.fail("rewrote a file that needs no change"))
    rewind(path, 3)
    assert path.read_bytes() == lines(ROWS)


def test_crash_during_rewind_leaves_the_original_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = lines(ROWS) + b"junk\n"
    path.write_bytes(original)

    def crash(src, dst):
        raise OSError(errno.EIO, "simulated crash mid-rename")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.warns(MetricsWarning), pytest.raises(OSError, match=f"cannot write {path}"):
        rewind(path, 1)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # the temporary file is cleaned up


def test_full_disk_names_the_path_and_free_bytes(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, FakeAccelerator(), resume_step=-1)
    log.log(ROWS[0])

    class FullDisk:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics, "open", FullDisk, raising=False)  # the module's open, not the builtin
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: SimpleNamespace(total=100, used=100, free=0))
    with pytest.raises(OSError) as err:
        log.log(ROWS[1])
    assert err.value.errno == errno.ENOSPC
    assert str(path) in str(err.value) and "0 bytes free" in str(err.value)
    assert "No space left on device" in str(err.value)
    assert read_metrics(path) == ROWS[:1]


def test_write_error_without_disk_usage_still_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "gone" / "metrics.jsonl"  # its directory does not exist: free space of the nearest parent
    with pytest.raises(OSError, match=r"cannot write .*metrics.jsonl: .*\(\d[\d,]* bytes free"):
        MetricsLog(path, FakeAccelerator(), resume_step=-1).log(ROWS[0])
