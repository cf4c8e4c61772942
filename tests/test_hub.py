"""data=hf with a Hub dataset id, offline: a dataset laid out as huggingface_hub's cache (tests/hub_cache.py) is
resolved, selected by revision, subset and split, streamed with per-rank shares and resumed exactly; a bad id stops
the launch in one line before any run directory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import hub_cache
from vsa_train.data import build_data, build_text_encoder, hf, hub
from vsa_train.data.streaming import StreamBatches, shuffled
from vsa_train.errors import MissingInput

pytest.importorskip("skvideo")
ROOT = Path(__file__).resolve().parents[1]
TRAIN = hub_cache.train_captions()  # the main commit's 12 train rows, two parquet files of 6


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The cached dataset under tmp_path, this process offline (nothing may reach the network)."""
    hub_cache.build(tmp_path / "hub")
    hub_cache.go_offline(monkeypatch, tmp_path)
    hub.resolve.cache_clear()  # resolved once per process: each test resolves against its own cache
    yield tmp_path
    hub.resolve.cache_clear()


def _cfg(**overrides):
    videos = OmegaConf.load(ROOT / "configs" / "data" / "videos.yaml")
    hf_yaml = OmegaConf.load(ROOT / "configs" / "data" / "hf.yaml")
    hf_yaml.pop("defaults")
    return OmegaConf.merge(videos, hf_yaml, {"path": hub_cache.REPO, "frames": 2, "height": 8, "width": 8,
                                             "num_workers": 0, **overrides})


def _captions(loader, n):
    it = iter(loader)
    return [c for _ in range(n) for c in next(it)["caption"]]


def test_a_path_is_local_when_it_exists_else_an_org_name_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "data").mkdir(parents=True)
    assert not hub.is_hub_id("local/data")  # exists here: local, though it reads as org/name
    assert hub.is_hub_id("org/name") and hub.is_hub_id("Org-1/name_2.v3")
    assert not any(hub.is_hub_id(p) for p in ("./org/name", "org/name/x", "name", "../name", "none.parquet", "/o/n"))


def test_the_id_resolves_from_the_cache_and_selects_revision_subset_split(offline):
    clips = hf.load_clips(_cfg())
    assert [c.caption for c in clips] == TRAIN
    assert clips[0].name == f"{hub_cache.REPO}@{hub_cache.MAIN[:12]}[0] videos/pristine.mp4"
    assert clips[0].source.fetch() == str((offline / "hub" / "datasets--vsa-test--clips" / "snapshots" /
                                           hub_cache.MAIN / "videos" / "pristine.mp4").resolve())
    assert [c.caption for c in hf.load_clips(_cfg(revision="v1"))] == ["old alpha", "old bravo", "old charlie",
                                                                         "old delta"]
    assert [c.caption for c in hf.load_clips(_cfg(revision=hub_cache.V1))][0] == "old alpha"  # a commit hash
    assert [c.caption for c in hf.load_clips(_cfg(split="test"))] == ["clip test"]
    embedded = hf.load_clips(_cfg(subset="embedded"))
    assert [c.caption for c in embedded] == ["clip embedded"] and isinstance(embedded[0].source, bytes)
    for bad, line in ((dict(subset="nope"), "data.subset='nope'"), (dict(split="valid"), "data.split='valid'")):
        with pytest.raises(MissingInput, match=line) as err:
            hf.load_clips(_cfg(**bad))
        assert "\n" not in str(err.value)


def test_a_repo_of_video_files_reads_as_a_video_column_of_their_paths(offline):
    hub_cache.build_folder(offline / "hub")
    cfg = _cfg(path="vsa-test/folder")
    assert [c.name.split(" ", 1)[1] for c in hf.load_clips(cfg)] == ["train/pristine.mp4", "train/distorted.mp4"]
    for streaming in (False, True):
        batch = next(iter(build_data(_cfg(path="vsa-test/folder", streaming=streaming), batch_size=2,
                                     eval_samples=1).train))
        assert sorted(batch["caption"]) == ["a blurry man", "a man"] and not batch["skipped"]


def _other_cache(root, monkeypatch, bad):
    """Reads the dataset from a cache whose train rows `bad` replaces (hub_cache.build)."""
    from huggingface_hub import constants

    hub_cache.build(root / "bad_hub", bad=bad)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "bad_hub"))
    hub.resolve.cache_clear()


def test_rows_outside_the_repo_or_missing_from_it_are_skipped_and_counted(offline, monkeypatch):
    _other_cache(offline, monkeypatch, {1: "videos/missing.mp4", 2: "../../outside.mp4", 3: "/etc/passwd"})
    clips = hf.load_clips(_cfg())
    assert "outside the dataset repo" in clips[2].error
    assert "outside the dataset's caches" in clips[3].error
    for streaming in (False, True):
        data = build_data(_cfg(streaming=streaming), batch_size=4, eval_samples=1)
        batch = next(iter(data.train))
        assert len(batch["caption"]) == 4 and set(batch["caption"]) <= set(TRAIN) - {TRAIN[1], TRAIN[2], TRAIN[3]}
        if streaming:  # rows 1-3 are bad: sample 1, 2, 3 each take row 4 (the next usable one)
            assert batch["caption"] == [TRAIN[0]] + [TRAIN[4]] * 3
            assert len(batch["skipped"]) == 3 and "not in the dataset repo" in batch["skipped"][0]


def test_streaming_ranks_read_disjoint_shares_that_cover_the_training_rows(offline):
    ds = hf.open_dataset(_cfg(), streaming=True)
    assert ds.num_shards == 2
    for world in (2, 3):  # 2: a parquet file per rank; 3: every third row
        for holdout in (0, 2):
            cfg = _cfg(streaming=True, holdout=holdout)
            shares = [[row["caption"] for _, row in StreamBatches(cfg, ds, None, None, 1, r, world).share()]
                      for r in range(world)]
            seen = [c for share in shares for c in share]
            assert len(seen) == len(set(seen)) and set(seen) == set(TRAIN[holdout:]), (world, holdout, shares)
    # decoded batches: rank r's first batch holds its own rows, at its global positions
    firsts = [next(iter(build_data(_cfg(streaming=True, holdout=2), batch_size=2, eval_samples=2, rank=r,
                                   world_size=2).train)) for r in range(2)]
    assert [b["caption"] for b in firsts] == [TRAIN[2:4], TRAIN[6:8]]
    assert [b["position"].tolist() for b in firsts] == [[0, 1], [2, 3]]


def test_streaming_holds_out_the_first_rows_for_eval(offline):
    data = build_data(_cfg(streaming=True, holdout=3), batch_size=3, eval_samples=4)
    assert data.eval["caption"] == [TRAIN[0], TRAIN[1], TRAIN[2], TRAIN[0]]  # cycled: 3 held out
    assert not set(_captions(data.train, 6)) & set(TRAIN[:3])  # two epochs of 9 rows: never a held-out one
    with pytest.raises(MissingInput, match="data.holdout=7: streaming holds out the first rows of the stream's "
                                           "first shard, which has 6"):
        build_data(_cfg(streaming=True, holdout=7), batch_size=1, eval_samples=1)
    assert build_data(_cfg(streaming=True), batch_size=1, eval_samples=2).eval["caption"] == TRAIN[:2]


@pytest.mark.parametrize("world", [1, 2])
def test_streaming_resumes_exactly(offline, monkeypatch, world):
    """Stop after k batches, resume from batch k (what a checkpoint's data position gives): the same samples as an
    uninterrupted run, across epochs, through a shuffle buffer, with bad rows and with loader workers."""
    _other_cache(offline, monkeypatch, {4: "videos/missing.mp4"})
    cfg = _cfg(streaming=True, holdout=1, shuffle_buffer=3)

    def run(start, n, workers=0, rank=0):
        loader = build_data(OmegaConf.merge(cfg, {"num_workers": workers}), batch_size=2, eval_samples=1, rank=rank,
                            world_size=world, start_batch=start).train
        it = iter(loader)
        return [next(it) for _ in range(n)]

    whole = run(0, 9)  # 18 samples: over three epochs of this rank's 11 (world 1) or 5-6 (world 2) rows
    assert len({tuple(b["caption"]) for b in whole}) > 3  # shuffled: epochs differ
    for start, workers in ((4, 0), (7, 2)):
        resumed = run(start, 9 - start, workers)
        assert [b["caption"] for b in resumed] == [b["caption"] for b in whole[start:]]
        assert [b["position"].tolist() for b in resumed] == [b["position"].tolist() for b in whole[start:]]
        assert all(a["video"].equal(b["video"]) for a, b in zip(resumed, whole[start:]))
    if world == 2:
        other = run(0, 9, rank=1)
        assert not {c for b in other for c in b["caption"]} & {c for b in whole for c in b["caption"]}


@pytest.mark.parametrize("fmt", ["parquet", "save_to_disk"])
def test_local_datasets_stream_too(tmp_path, fmt):
    from datasets import Dataset

    clip = hub_cache.clips_folder() / "carphone_pristine.mp4"
    ds = Dataset.from_dict({"video": [str(clip)] * 4, "caption": TRAIN[:4]})
    path = tmp_path / ("ds" if fmt == "save_to_disk" else "rows.parquet")
    ds.save_to_disk(str(path)) if fmt == "save_to_disk" else ds.to_parquet(str(path))
    cfg = _cfg(path=str(path), allow_outside_root=True, streaming=True, holdout=1)
    data = build_data(cfg, batch_size=2, eval_samples=1)
    assert data.eval["caption"] == TRAIN[:1] and _captions(data.train, 3) == TRAIN[1:4] + TRAIN[1:4]


def test_shuffle_buffer_is_a_seeded_permutation():
    import numpy as np

    out = list(shuffled(range(10), 4, np.random.default_rng(0)))
    assert sorted(out) == list(range(10)) and out != list(range(10))
    assert out == list(shuffled(range(10), 4, np.random.default_rng(0)))


def test_streaming_text_encoder_needs_no_caption_list(offline):
    enc = build_text_encoder(_cfg(streaming=True))
    emb, mask = enc.encode(["clip alpha", "clip bravo"])
    assert mask.sum() == 4 and not emb[0, 1].equal(emb[1, 1]) and emb[0, 0].equal(emb[1, 0])


def _problems(*overrides):
    from hydra import compose, initialize_config_dir

    from vsa_train.config_schema import problems

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return problems(compose(config_name="train", overrides=["data=hf", *overrides]))


def test_the_config_check_refuses_what_cannot_be_read(offline, monkeypatch, tmp_path):
    assert _problems(f"data.path={hub_cache.REPO}", "data.revision=v1") == []
    assert _problems("data.path=nobody/nothing") == [
        f"data.path='nobody/nothing': HF_HUB_OFFLINE is set and the local Hub cache "
        f"{offline / 'hub' / 'datasets--nobody--nothing'} holds no snapshot of revision 'main'"]
    assert "holds no snapshot of revision 'v9'" in _problems(f"data.path={hub_cache.REPO}", "data.revision=v9")[0]
    local = ROOT / "data" / "sample_clips.csv"
    assert _problems(f"data.path={local}", "data.subset=x") == [
        f"data.subset='x' is for a Hub dataset id; data.path='{local}' is local"]
    assert _problems(f"data.path={local}", "data.shuffle_buffer=8") == [
        "data.shuffle_buffer=8 is for data.streaming=true (the rows in memory are reshuffled every epoch)"]
    # a loading script is refused, never run
    script = offline / "hub" / "datasets--vsa-test--clips" / "snapshots" / hub_cache.MAIN / "clips.py"
    script.write_text("raise SystemExit('ran')\n")
    hub.resolve.cache_clear()
    assert _problems(f"data.path={hub_cache.REPO}") == [
        "data.path='vsa-test/clips' comes with a loading script (clips.py); vsa_train runs no code from a dataset: "
        "use a dataset of data files (parquet, csv, json lines, or videos)"]
    # online, but the Hub cannot be reached: the cache serves, and without a cached copy the launch stops
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    hub.resolve.cache_clear()
    assert _problems(f"data.path={hub_cache.REPO}", "data.revision=v1") == []
    line, = _problems("data.path=nobody/nothing")
    assert line.startswith("data.path='nobody/nothing': the Hub cannot be reached (") and "no snapshot" in line


def _train_py(*args, cwd, env):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


TINY = ["data=hf", "data.frames=2", "data.height=8", "data.width=8", "data.num_workers=0", "train.batch_size=2",
        "train.eval_samples=2", "train.eval_timesteps=1", "train.eval_batch_size=2", "train.log_every=1",
        "logger=none"]


def test_train_py_trains_from_a_hub_id_and_refuses_a_bad_one_before_any_directory(tmp_path):
    """Real processes with HF_HUB_OFFLINE=1 in their environment (read by huggingface_hub and datasets at import)."""
    hub_cache.build(tmp_path / "hub")
    env = hub_cache.offline_env(tmp_path)
    proc = _train_py(*TINY, f"data.path={hub_cache.REPO}", "data.streaming=true", "data.holdout=2",
                     "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from vsa_train.metrics import read_metrics

    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 2
    proc = _train_py(*TINY, "data.path=nobody/nothing", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0] == (f"invalid config: data.path='nobody/nothing': HF_HUB_OFFLINE is set and the local Hub cache "
                        f"{tmp_path / 'hub' / 'datasets--nobody--nothing'} holds no snapshot of revision 'main'")
    assert not (tmp_path / "bad").exists()


def _launch(run_dir, *overrides):
    """One launch of train.py's trainer in this process, resolving the id afresh (a new process would)."""
    from hydra import compose, initialize_config_dir

    from vsa_train import trainer

    hub.resolve.cache_clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return trainer.train(compose(config_name="train", overrides=[
            *TINY, f"data.path={hub_cache.REPO}", f"run_dir={run_dir}", *overrides]))


def test_a_resume_must_read_the_dataset_commit_the_run_trained_on(offline):
    """data.revision=main moving between launches: the checkpoint's commit against the one the launch resolves to."""
    from vsa_train.checkpoint.format import read_state
    from vsa_train.rundir import RunDir, RunDirError

    run = offline / "run"
    _launch(run, "train.max_steps=1")
    _launch(run, "train.max_steps=2")  # the same commit: resumes
    assert read_state(RunDir(run).checkpoints.dirs()[-1])["data_commit"] == hub_cache.MAIN
    (offline / "hub" / "datasets--vsa-test--clips" / "refs" / "main").write_text(hub_cache.V1)  # main moved on
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError) as err:
        _launch(run, "train.max_steps=3")
    line, = str(err.value).splitlines()
    assert line == (f"{RunDir(run).checkpoints.dirs()[-1]} trained on {hub_cache.REPO} at commit {hub_cache.MAIN}; "
                    f"data.revision=main now resolves to {hub_cache.V1}: resume on its data with "
                    f"data.revision={hub_cache.MAIN} run_dir={run}, or go on with the new commit with "
                    f"train.resume=force (recorded in config_history.jsonl).")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # refused: nothing written
    # pinned to the run's commit: resumes (quoted: the fixture's all-digit commit would read as a number)
    _launch(run, "train.max_steps=3", f"data.revision='{hub_cache.MAIN}'")
    _launch(run, "train.max_steps=4", "train.resume=force")  # main's new commit, recorded
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["data_commit"] for h in history] == [hub_cache.MAIN] * 3 + [hub_cache.V1]
    assert [h["changed"] for h in history] == [{}, {}, {}, {"data_commit": [hub_cache.MAIN, hub_cache.V1]}]
    assert [h["forced"] for h in history] == [False, False, False, True] and history[2]["resumed_from"]
    assert read_state(RunDir(run).checkpoints.dirs()[-1])["data_commit"] == hub_cache.V1
    _launch(run, "train.max_steps=5")  # the run is on the new commit now: the same launch resumes it
    assert read_state(RunDir(run).checkpoints.dirs()[-1])["step"] == 5


def test_without_a_recorded_commit_the_revisions_are_compared_as_written(tmp_path):
    """A run with no checkpoint that recorded a commit (none yet, or older ones): data.revision as any FIXED key;
    a pinned commit equal to the checkpoint's is no change."""
    from vsa_train.rundir import Launch, RunDir, RunDirError

    run = RunDir(tmp_path)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"data": {"path": hub_cache.REPO, "revision": None}}))

    def launch(revision, commit):
        cfg = OmegaConf.create({"data": {"path": hub_cache.REPO, "revision": revision}})
        return Launch(cfg=cfg, processes=1, global_batch=2, resume="auto", data_commit=commit)

    with pytest.raises(RunDirError, match=r"belongs to a run with data.revision=None; this launch has 'v1'"):
        run.check_launch(launch("v1", hub_cache.V1))
    same = launch(hub_cache.MAIN, hub_cache.MAIN)
    assert run._resolved_change(same, {"data_commit": hub_cache.MAIN}, "data_commit") == []
    assert run._config_changes(launch(hub_cache.MAIN, hub_cache.MAIN)) == []  # compared by commit instead
