"""Head training: sample assembly, sampler, feature cache, checkpoints / resume, exports, hub loading, the demo."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nearid_core
from nearid_core import PreprocessConfig, load_model
from nearid_core.data import MTGRecord, NearIDRecord, load_local_mtg, load_local_nearid
from nearid_core.feature_cache import FeatureCache, HubImage, content_digest, open_ref, token_encoder
from nearid_core.preprocessing import load_image, pil_to_tensor, preprocess
from nearid_core.runs import checkpoint_dirs, clean_stale_checkpoints, latest_checkpoint
from nearid_core.synthetic import write_dataset, write_mtg
from nearid_core.train import (
    HeadModule,
    batch_loss,
    cli,
    load_checkpoint,
    main,
    parse_args,
    save_checkpoint,
)
from nearid_core.train_data import (
    AugmentConfig,
    EpochSampler,
    JointTrainSet,
    MTGTrainSet,
    NearIDTrainSet,
    PixelCollate,
    SplitOverlapError,
    TokenCollate,
    augment_image,
    check_disjoint,
    keyed_records,
    load_hub_nearid_training,
)

SOURCES = ("src_a", "src_b")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """10 identities (2-3 views, 32 px), two distractor sources with a few missing, splits 6/2/2, 3 MTG samples."""
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root / "data", 10, n_views=(2, 3), image_size=32, sources=SOURCES, seed=3,
                  splits={"train": 6, "val": 2, "test": 2}, missing_rate=0.15, write_masks=False)
    write_mtg(root / "mtg", 3, image_size=32, seed=3)
    return root


@pytest.fixture(scope="module")
def tiny_model(siglip_vision_dir):
    model, directory = load_model(siglip_vision_dir, dtype=torch.float32)
    model.freeze_backbone()
    return model, PreprocessConfig.from_pretrained(directory)


def _rec(views, distractors, index=0, identity="x"):
    return NearIDRecord(identity, None, list(views), [None] * 3, {s: list(v) for s, v in distractors.items()}, index)


# ====================================================================================================================
# Sample assembly (reference section 3.4 / 3.6)
# ====================================================================================================================


def test_anchor_is_redrawn_each_epoch_deterministically(dataset):
    records = load_local_nearid(dataset / "data", SOURCES, "train")
    ts = NearIDTrainSet(records, SOURCES, seed=5)
    i = next(k for k, r in enumerate(records) if r.n_views == 3)
    perms = [tuple(ts.sample(i, e).perm) for e in range(12)]
    assert perms == [tuple(ts.sample(i, e).perm) for e in range(12)]  # a pure function of (seed, epoch, row)
    assert all(sorted(p) == [0, 1, 2] for p in perms)
    assert len(set(perms)) > 1 and len({p[0] for p in perms}) > 1  # the anchor changes across epochs
    assert perms != [tuple(NearIDTrainSet(records, SOURCES, seed=6).sample(i, e).perm) for e in range(12)]
    s = ts.sample(i, 3)
    assert s.items[:3] == [records[i].views[j] for j in s.perm] and s.pos_mask == [True] * 3
    assert NearIDTrainSet(records, SOURCES, shuffle_anchor=False).sample(i, 3).perm == [0, 1, 2]


def test_negative_k_is_the_distractor_in_positive_k_background(dataset):
    records = load_local_nearid(dataset / "data", SOURCES, "train")
    ts = NearIDTrainSet(records, SOURCES, seed=0)
    checked = 0
    for i, rec in enumerate(records):
        for epoch in range(3):
            s = ts.sample(i, epoch)
            for k, j in enumerate(s.perm):
                neg = s.items[3 + k]
                assert neg == rec.distractors[s.neg_sources[j]][j]
                if neg is None:
                    assert not s.neg_mask[k]
                    continue
                assert Path(neg).name == Path(s.items[k]).name == f"view{j + 1}.png"
                # the synthetic distractor is pixel-identical to its view outside the two objects: same background
                same = (np.asarray(Image.open(neg)) == np.asarray(Image.open(s.items[k]))).all(-1).mean()
                assert same > 0.5
                checked += 1
    assert checked > 20


def test_negative_source_is_drawn_per_slot_and_epoch():
    rec = _rec(["v0", "v1", "v2"], {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1", "c2"]}, 7)
    ts = NearIDTrainSet([rec], ["a", "b", "c"], seed=1)
    draws = [ts.sample(0, e).neg_sources for e in range(20)]
    assert draws == [ts.sample(0, e).neg_sources for e in range(20)]
    assert {s for d in draws for s in d} == {"a", "b", "c"}
    assert any(len(set(d)) > 1 for d in draws)  # slots of one sample draw independently
    for e in range(20):
        s = ts.sample(0, e)
        assert [n[0] for n in s.items[3:]] == [s.neg_sources[j][0] for j in s.perm]
        assert [n[1] for n in s.items[3:]] == [str(j) for j in s.perm]
    single = NearIDTrainSet([rec], ["b"], seed=1)
    assert all(single.sample(0, e).neg_sources == ["b", "b", "b"] for e in range(5))


def test_missing_views_and_distractors_are_masked():
    rec = _rec(["v0", None, "v2"], {"a": ["a0", None, None]}, 3)
    ts = NearIDTrainSet([rec], ["a"], seed=0)
    for e in range(6):
        s = ts.sample(0, e)
        assert sorted(s.perm) == [0, 2] and s.pos_mask == [True, True, False] and s.items[2] is None
        assert s.neg_mask == [j == 0 for j in s.perm] + [False]
        assert s.items[5] is None and s.neg_sources[1] is None
    with pytest.raises(ValueError, match="at least 2"):
        NearIDTrainSet([_rec(["v0", None, None], {"a": ["a0", None, None]})], ["a"]).sample(0, 0)


def test_mtg_slot_mapping_and_joint_repeat():
    recs = [MTGRecord(f"m{i}", (f"o1_{i}", f"o2_{i}"), (f"e1_{i}", None if i == 1 else f"e2_{i}")) for i in range(3)]
    mtg = MTGTrainSet(recs, seed=0)
    anchors = set()
    for e in range(8):
        s = mtg.sample(0, e)
        assert s.kind == "mtg" and sorted(s.perm) == [0, 1]
        assert s.items[0] == f"o{s.perm[0] + 1}_0" and s.items[3] == f"e{s.perm[0] + 1}_0"  # edit of the anchor view
        assert s.items[1] == f"o{s.perm[1] + 1}_0" and s.items[4] == f"e{s.perm[1] + 1}_0"
        assert s.items[2] is None and s.items[5] is None
        assert s.pos_mask == [True, True, False] and s.neg_mask == [True, True, False]
        anchors.add(s.perm[0])
    assert anchors == {0, 1}
    s = mtg.sample(1, 0)
    assert s.neg_mask == [s.perm[0] == 0, s.perm[1] == 0, False]  # image_2_inpainted is missing
    nearid = NearIDTrainSet([_rec(["v0", "v1", None], {"a": ["a0", "a1", None]}, k) for k in range(5)], ["a"])
    joint = JointTrainSet(nearid, mtg, mtg_repeat=4)
    assert len(joint) == 5 + 12
    assert [joint.locate(i) for i in (4, 5, 7, 8, 16)] == [("nearid", 4), ("mtg", 0), ("mtg", 2), ("mtg", 0),
                                                          ("mtg", 2)]
    assert joint[(3, 5)] == joint[(3, 8)] == joint[(3, 14)]  # copies of an MTG row are identical within an epoch


def test_epoch_sampler_order_sharding_and_position():
    s = EpochSampler(10, 3, epochs=2, seed=4)
    assert s.steps_per_epoch == 4 and s.total_steps == 8
    batches = list(s)
    assert len(batches) == 8 and len(batches[3]) == 1  # last partial batch kept on one process
    for epoch in (0, 1):
        seen = [i for b in batches[4 * epoch : 4 * epoch + 4] for e, i in b if e == epoch]
        assert sorted(seen) == list(range(10))
    assert [i for _, i in batches[0]] != [i for _, i in batches[4]]  # a new order every epoch
    for _ in range(5):
        s.advance()
    assert (s.epoch, s.batch, s.global_step, len(s)) == (1, 1, 5, 3)
    assert list(s) == batches[5:]  # iteration starts at the position; prefetching does not move it
    fresh = EpochSampler(10, 3, epochs=2, seed=4)
    fresh.load_state_dict(s.state_dict())
    assert list(fresh) == batches[5:]
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(10, 2, epochs=2, seed=4).load_state_dict(s.state_dict())
    r0, r1 = EpochSampler(10, 2, 1, seed=4, num_replicas=2, rank=0), EpochSampler(10, 2, 1, seed=4, num_replicas=2,
                                                                                  rank=1)
    assert r0.steps_per_epoch == 2 and r0.drop_last  # equal batch sizes on every process
    for a, b in zip(r0, r1):
        assert len(a) == len(b) == 2 and not {i for _, i in a} & {i for _, i in b}


def test_overlapping_splits_are_refused(dataset, siglip_vision_dir, tmp_path):
    with pytest.raises(SplitOverlapError, match="2 rows with the test split"):
        check_disjoint([1, 2, 3], {"validation": [7], "test": [3, 2]}, "rows")
    check_disjoint(["a"], {"test": ["b"]})
    data = tmp_path / "data"
    shutil.copytree(dataset / "data", data)
    test_ids = json.loads((data / "splits" / "test.json").read_text())
    train_ids = json.loads((data / "splits" / "train.json").read_text())
    (data / "splits" / "train.json").write_text(json.dumps(train_ids + test_ids[:1]))
    with pytest.raises(SplitOverlapError, match="test split"):
        main(["--model", str(siglip_vision_dir), "--data-dir", str(data), "--output-dir", str(tmp_path / "run"),
              "--cpu", "--report-to", "none"])
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("argv, message", [
    (["--hf"], "--train-indices"),
    (["--hf", "--train-indices", "t.json"], "--neg-sources"),
    (["--hf", "--train-indices", "all", "--neg-sources", "flux", "--test-indices", "t.json"], "overlaps"),
    (["--data-dir", "d", "--hf"], "exactly one"),
    (["--data-dir", "d", "--train-indices", "t.json"], "--hf"),
    (["--data-dir", "d", "--mtg-repeat", "2"], "needs MTG"),
    (["--data-dir", "d", "--augment", "--cache-dir", "c"], "on the fly"),
    (["--data-dir", "d", "--mixed-precision", "fp16", "--cpu"], "CUDA"),
    (["--data-dir", "d", "--export-only"], "--resume"),
    (["--data-dir", "d", "--max-steps", "5", "--stop-after-steps", "5"], "below"),
    (["--data-dir", "d", "--report-to", "wandb"], None),
])
def test_flag_validation_happens_before_loading(argv, message):
    argv = [*argv, "--output-dir", "out"]
    if message is None:  # --report-to names a tracker: refused only when it is not installed
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            with pytest.raises(ValueError, match="not installed"):
                parse_args(argv)
        return
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


# ====================================================================================================================
# The command line contract: every user mistake is exit status 2 and one message, never a traceback
# ====================================================================================================================


@pytest.fixture(scope="module")
def bad_inputs(dataset, tmp_path_factory) -> dict[str, str]:
    """Paths for the contract table: a file, an empty folder, a non-JSON split file, datasets without / with an
    empty validation split."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "file.txt").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "rows.json").write_text("[0, 1]")
    (root / "notjson.json").write_text("rows 0 and 1")
    shutil.copytree(dataset / "data", root / "noval")
    (root / "noval" / "splits" / "val.json").unlink()
    shutil.copytree(dataset / "data", root / "emptyval")
    (root / "emptyval" / "splits" / "val.json").write_text("[]")
    return {"file": str(root / "file.txt"), "empty": str(root / "empty"), "rows": str(root / "rows.json"),
            "notjson": str(root / "notjson.json"), "noval": str(root / "noval"), "emptyval": str(root / "emptyval"),
            "data": str(dataset / "data")}


# (argv with {placeholders} from bad_inputs, a phrase of the one message); --output-dir, --model, --cpu are added
CLI_MISTAKES = [
    ([], "required: --output-dir"),
    (["--data-dir", "{data}", "--batch-size", "abc"], "invalid int value"),
    (["--data-dir", "{data}", "--hf"], "exactly one"),
    (["--data-dir", "{data}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data-dir", "{data}", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["--data-dir", "{data}", "--lr", "inf"], "--lr must be a finite number > 0"),
    (["--data-dir", "{data}", "--temperature", "-1"], "--temperature must be a finite number > 0"),
    (["--data-dir", "{data}", "--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--data-dir", "{data}", "--mixed-precision", "fp16", "--cpu"], "needs a CUDA device"),
    (["--data-dir", "{data}", "--val-split", "none", "--val-sources", "src_a"], "--val-sources needs a validation"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data does not exist"),
    (["--data-dir", "{file}"], "is a file, not a folder"),
    (["--data-dir", "{empty}"], "is not a NearID dataset folder"),
    (["--data-dir", "{data}", "--train-split", "nope"], "--train-split nope"),
    (["--data-dir", "{data}", "--val-split", "nope"], "split 'nope'"),
    (["--data-dir", "{data}", "--neg-sources", "nope"], "unknown distractor source"),
    (["--data-dir", "{data}", "--mtg-dir", "/nonexistent/mtg"], "--mtg-dir /nonexistent/mtg is not a folder"),
    (["--data-dir", "{data}", "--mtg-dir", "{empty}"], "no MTG sample folders"),
    (["--data-dir", "{noval}", "--eval-steps", "2"], "--eval-steps needs a validation split"),
    (["--data-dir", "{emptyval}"], "the validation split is empty"),
    (["--data-dir", "{data}", "--resume", "/nonexistent/checkpoint-3"], "not a checkpoint directory"),
    (["--data-dir", "{data}", "--resume", "latest", "--export-only"], "no checkpoint in"),
    (["--data-dir", "{data}", "--cache-dir", "{file}"], "--cache-dir"),
    (["--data-dir", "{data}", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--hf", "--train-indices", "/nonexistent/train.json", "--neg-sources", "flux"], "no such file"),
    (["--hf", "--train-indices", "{notjson}", "--neg-sources", "flux"], "is not a JSON list of row positions"),
    (["--hf", "--train-indices", "{rows}", "--test-indices", "{rows}", "--neg-sources", "flux"], "test split"),
]
OUTPUT_MISTAKES = [("", "--output-dir is empty"), ("{file}", "is a file"), ("{file}/sub", "cannot be written")]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", CLI_MISTAKES, ids=[m for _, m in CLI_MISTAKES])
def test_cli_user_mistakes_exit_2_with_one_message(argv, message, bad_inputs, siglip_vision_dir, tmp_path, capsys):
    argv = [a.format(**bad_inputs) for a in argv]
    if argv:
        argv += ["--output-dir", str(tmp_path / "out"), "--cpu", "--report-to", "none"]
        if "--model" not in argv:
            argv += ["--model", str(siglip_vision_dir)]
    code, err = _cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and message in err, err
    assert err.count("error:") == 1 and message in err.strip().splitlines()[-1], err  # argparse adds usage lines
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("output, message", OUTPUT_MISTAKES)
def test_cli_unusable_output_dir_exits_2(output, message, bad_inputs, capsys):
    code, err = _cli(["--data-dir", bad_inputs["data"], "--output-dir", output.format(**bad_inputs), "--cpu"], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_cli_damaged_checkpoint_exits_2_naming_it(bad_inputs, siglip_vision_dir, tmp_path, capsys):
    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3')  # cut short
    code, err = _cli(["--model", str(siglip_vision_dir), "--data-dir", bad_inputs["data"], "--output-dir",
                      str(tmp_path / "out"), "--resume", "latest", "--cpu", "--report-to", "none"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{checkpoint} is damaged" in err and "resume from another checkpoint" in err, err


def test_cli_as_a_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nearid_core.train", "--data-dir", str(tmp_path / "missing"),
                           "--output-dir", str(tmp_path / "out"), "--cpu"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"python -m nearid_core.train: error: --data-dir {tmp_path / 'missing'} does not exist; pass a dataset folder "
        "in the local layout (identities/, distractors/<source>/, splits/; see nearid_core.data)")


def test_data_too_small_for_a_batch_or_a_validation_split_warns(siglip_vision_dir, tmp_path, caplog):
    write_dataset(tmp_path / "two", 2, n_views=3, image_size=32, sources=("src_a",), seed=1, splits={"train": 2},
                  write_masks=False)
    with caplog.at_level("WARNING", logger="nearid_core.train"):
        assert main(["--model", str(siglip_vision_dir), "--data-dir", str(tmp_path / "two"), "--output-dir",
                     str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "8", "--export", "none", "--cpu",
                     "--report-to", "none"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cannot fill one batch: 2 samples (2 identities) for --batch-size 8" in w and
               "Lower --batch-size to 2 or less" in w for w in warnings), warnings
    assert any("val.json does not exist: training runs without validation" in w for w in warnings), warnings
    with pytest.raises(ValueError, match="fewer than one global batch .* lower the batch size to 1 or less"):
        EpochSampler(2, 8, 1, num_replicas=2)


# ====================================================================================================================
# Feature cache
# ====================================================================================================================


def test_cache_keys_are_content_based_and_namespaced(dataset, tmp_path):
    ns = {"backbone": "b1", "preprocess": {"size": 56}}
    a = FeatureCache(tmp_path / "c", ns, (4, 8))
    view = dataset / "data" / "identities" / "id0000" / "view1.png"
    copy = tmp_path / "renamed.png"
    shutil.copy(view, copy)
    assert a.key(view) == a.key(copy) == FeatureCache(tmp_path / "c", ns, (4, 8)).key(view)  # stable, by content
    assert a.key(view) != a.key(dataset / "data" / "identities" / "id0000" / "view2.png")
    assert a.key(view) != FeatureCache(tmp_path / "c", {**ns, "preprocess": {"size": 64}}, (4, 8)).key(view)
    assert a.key(view) != FeatureCache(tmp_path / "c", {**ns, "backbone": "b2"}, (4, 8)).key(view)
    assert a.key(view) != FeatureCache(tmp_path / "c", ns, (4, 8), dtype="bf16").key(view)
    assert content_digest(Image.open(view)) == content_digest(Image.open(copy))  # decoded: pixel hash
    memo = (tmp_path / "c" / "digests" / "r0.tsv").read_text()
    assert str(view.resolve()) in memo  # digest memo: a resumed run does not re-read the file


@pytest.mark.parametrize("dtype, atol", [("fp32", 0.0), ("fp16", 5e-3), ("bf16", 3e-2)])
def test_cache_fill_is_resumable_and_equals_encode_tokens(dataset, tiny_model, tmp_path, dtype, atol):
    model, pre = tiny_model
    paths = sorted((dataset / "data" / "identities").glob("*/view*.png"))[:7]
    calls: list[int] = []
    base = token_encoder(model, pre)

    def encode(refs):
        calls.append(len(refs))
        return base(refs)

    cache = FeatureCache.for_model(tmp_path / "cache", model, pre, dtype=dtype, shard_size=3)
    assert cache.fill(paths[:4], encode, batch_size=2) == 4 and calls == [2, 2]
    with open(next(cache.directory.glob("r0/index.tsv")), "a") as f:
        f.write(f"{'0' * 40}\t0\t2")  # a line cut by a crash (then terminated by the next append) is ignored
    again = FeatureCache.for_model(tmp_path / "cache", model, pre, dtype=dtype, shard_size=3)
    assert len(again) == 4
    assert again.fill(paths + paths[:2], encode, batch_size=2) == 3 and calls == [2, 2, 2, 1]  # only the missing
    assert len(FeatureCache.for_model(tmp_path / "cache", model, pre, dtype=dtype, shard_size=3)) == 7
    keys = [again.key(p) for p in paths]
    tokens = again.tokens(keys[::-1])
    assert tokens.dtype == again.torch_dtype and tokens.shape == (7, 16, 32)
    with torch.no_grad():
        expected = model.encode_tokens(preprocess(torch.stack([pil_to_tensor(load_image(p)) for p in paths]), pre))
    torch.testing.assert_close(tokens.float(), expected.flip(0), atol=atol, rtol=atol)
    assert len(list(again.directory.glob("r0/shard-*.npy"))) == 3
    with pytest.raises(KeyError, match="fill it first"):
        again.tokens(["0" * 40])


def test_training_from_cache_equals_on_the_fly_encoding(dataset, tiny_model, tmp_path):
    model, pre = tiny_model
    records = load_local_nearid(dataset / "data", SOURCES, "train")
    cache = FeatureCache.for_model(tmp_path / "cache", model, pre, dtype="fp32")
    keyed = keyed_records(records, cache)
    cache.fill([r for rec in records for r in [*rec.views, *rec.distractors["src_a"], *rec.distractors["src_b"]]],
               token_encoder(model, pre), batch_size=16)
    with torch.no_grad():
        pad = model.encode_tokens(torch.zeros(1, 3, 56, 56))[0]
    idx = [0, 3, 5, 1]
    by_cache = TokenCollate(cache, pad)([NearIDTrainSet(keyed, SOURCES, seed=2).sample(i, 1) for i in idx])
    by_pixels = PixelCollate(pre)([NearIDTrainSet(records, SOURCES, seed=2).sample(i, 1) for i in idx])
    assert torch.equal(by_cache["pos_mask"], by_pixels["pos_mask"])
    assert torch.equal(by_cache["neg_mask"], by_pixels["neg_mask"])
    tokens = pad.expand(len(idx) * 6, *pad.shape).clone()
    with torch.no_grad():
        tokens[by_pixels["present"]] = model.encode_tokens(by_pixels["pixels"])
    head = HeadModule(model)
    grads, losses = [], []
    for t, b in ((by_cache["tokens"], by_cache), (tokens, by_pixels)):
        model.head.zero_grad()
        out = batch_loss(head, t, b["pos_mask"], b["neg_mask"])
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append([p.grad.clone() for p in model.head.parameters()])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0])
    head_ids = {id(p) for p in model.head.parameters()}
    assert all(p.grad is None for p in model.backbone.parameters() if id(p) not in head_ids)


def test_augmentation_is_deterministic_per_seed():
    x = torch.rand(3, 24, 24)
    cfg = AugmentConfig(flip_p=1.0, jitter_p=1.0, affine_p=1.0)
    a = augment_image(x, np.random.default_rng([1, 2, 3]), cfg)
    assert torch.equal(a, augment_image(x, np.random.default_rng([1, 2, 3]), cfg))
    assert not torch.equal(a, augment_image(x, np.random.default_rng([1, 2, 4]), cfg))
    assert a.shape == x.shape and 0 <= float(a.min()) and float(a.max()) <= 1


# ====================================================================================================================
# Checkpoints, resume, exports
# ====================================================================================================================


def _step_state(tmp_path):
    head = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    head(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    return head, opt, sched


def test_checkpoints_are_atomic_pruned_and_restore_state(tmp_path, monkeypatch):
    head, opt, sched = _step_state(tmp_path)
    kw = dict(head_state=head.state_dict(), optimizer=opt, scheduler=sched, trainer_state={"sampler": {"epoch": 1}})
    save_checkpoint(tmp_path, 10, **kw)
    real_save = torch.save

    def crash(obj, path, *a, **k):
        if str(path).endswith("scheduler.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 20, **kw)
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"  # the crashed save left no checkpoint-20
    assert not (tmp_path / "checkpoint-20").exists()
    assert (tmp_path / ".checkpoint-20.tmp" / ".owner.json").is_file()  # ... but its temporary folder
    assert clean_stale_checkpoints(tmp_path) == [tmp_path / ".checkpoint-20.tmp"]
    assert not list((tmp_path / "checkpoint-10").glob(".owner*"))  # committed checkpoints carry no owner record
    for step in (20, 30, 40):
        save_checkpoint(tmp_path, step, **kw, total_limit=2)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [30, 40]
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    save_checkpoint(tmp_path, 50, **kw)
    torch.rand(5)
    head2, opt2, sched2 = _step_state(tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint-50", head=head2, optimizer=opt2, scheduler=sched2)
    assert state["global_step"] == 50 and state["sampler"] == {"epoch": 1}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    assert sched2.state_dict() == sched.state_dict()
    for a, b in zip(head2.parameters(), head.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp_folder(root: Path, name: str, owner: dict | None = None, age_s: float = 0.0) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "head.safetensors").write_bytes(b"x" * 1000)
    if owner is not None:
        (path / ".owner.json").write_text(json.dumps(owner))
    if age_s:
        os.utime(path, (time.time() - age_s,) * 2)
    return path


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="tells a reused PID by /proc/PID/stat")
def test_stale_checkpoint_folders_are_cleaned_but_not_those_of_running_writers(tmp_path):
    from nearid_core.runs import _process_start

    host, dead = socket.gethostname(), _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {"pid": sleeper.pid, "host": host, "start": _process_start(sleeper.pid)}
        stale = [
            _temp_folder(tmp_path, ".checkpoint-5.tmp", {"pid": dead, "host": host}),  # killed run
            _temp_folder(tmp_path, f".checkpoint-6.tmp-{dead}"),  # older versions' name
            _temp_folder(tmp_path, f".checkpoint-7.old-{dead}"),  # killed during commit_checkpoint
            _temp_folder(tmp_path, ".checkpoint-8.tmp", {"pid": os.getpid(), "host": host}),  # this process: not saving
            _temp_folder(tmp_path, ".checkpoint-9.tmp", {**live, "start": "1"}),  # the PID was reused since
            _temp_folder(tmp_path, ".checkpoint-10.tmp", age_s=3600),  # no record, untouched for an hour
        ]
        kept = [
            _temp_folder(tmp_path, ".checkpoint-11.tmp", live),  # being written right now
            _temp_folder(tmp_path, ".checkpoint-12.tmp"),  # no record yet: just created
            _temp_folder(tmp_path, ".checkpoint-13.tmp", {"pid": dead, "host": host + "-other"}),  # unknowable
            _temp_folder(tmp_path, "checkpoint-4"),  # not temporary
            _temp_folder(tmp_path, ".checkpoint-x.tmp", age_s=3600),  # not ours
        ]
        assert sorted(clean_stale_checkpoints(tmp_path)) == sorted(stale)
        assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert clean_stale_checkpoints(tmp_path) == [tmp_path / ".checkpoint-11.tmp"]  # its writer has gone
    assert clean_stale_checkpoints(tmp_path / "missing") == []


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(dataset, siglip_vision_dir, tmp_path_factory):
    """An uninterrupted 8-step run, and the same run stopped after 3 steps and resumed with --resume latest."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--model", str(siglip_vision_dir), "--data-dir", str(dataset / "data"), "--mtg-dir",
              str(dataset / "mtg"), "--mtg-repeat", "2", "--batch-size", "3", "--max-steps", "8", "--lr", "3e-3",
              "--warmup-steps", "2", "--checkpointing-steps", "3", "--cache-dir", str(root / "cache"), "--cpu",
              "--report-to", "none", "--export-dtype", "fp32", "--cache-dtype", "fp32"]
    assert main([*common, "--output-dir", str(root / "full")]) == 0
    assert main([*common, "--output-dir", str(root / "split"), "--stop-after-steps", "3", "--export", "none"]) == 0
    assert not (root / "split" / "export").exists() and latest_checkpoint(root / "split").name == "checkpoint-3"
    # a save that a kill interrupted (as run.py leaves it): cleaned when the run starts again
    _temp_folder(root / "split", ".checkpoint-4.tmp", {"pid": _dead_pid(), "host": socket.gethostname()})
    assert main([*common, "--output-dir", str(root / "split"), "--resume", "latest", "--export", "none"]) == 0
    return root


def test_resume_latest_reproduces_the_uninterrupted_losses(runs):
    full, split = _read_csv(runs / "full" / "train_log.csv"), _read_csv(runs / "split" / "train_log.csv")
    assert [r["step"] for r in full] == [str(s) for s in range(1, 9)]
    for name in ("step", "epoch", "loss", "tier1", "tier2", "lr", "grad_norm"):
        assert [r[name] for r in full] == [r[name] for r in split], name  # bit-identical, printed with repr()
    assert len({r["loss"] for r in full}) > 1
    assert [s for s, _ in checkpoint_dirs(runs / "full")] == [3, 6, 8]
    assert not list((runs / "split").glob(".checkpoint-*"))  # the interrupted save's folder was cleaned on start
    val = _read_csv(runs / "full" / "val_log.csv")
    assert {r["step"] for r in val} == {"0", "3", "6", "8"} and {r["source"] for r in val} == {*SOURCES, "all"}
    summary = json.loads((runs / "full" / "train_summary.json").read_text())
    assert summary["finished"] and summary["feature_cache"]["entries"] > 0


def test_exports_load_back_with_identical_embeddings(runs, siglip_vision_dir, dataset, tmp_path):
    trained, _ = load_model(siglip_vision_dir, dtype=torch.float32)
    load_checkpoint(runs / "full" / "checkpoint-8", head=trained.head, restore_rng=False)
    release, _ = nearid_core.load_model(runs / "full" / "export" / "release", dtype=torch.float32)
    head_only, _ = nearid_core.load_model(runs / "full" / "export" / "nearid_head.safetensors", dtype=torch.float32)
    baseline, _ = load_model(siglip_vision_dir, dtype=torch.float32)
    pixels = torch.rand(3, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        expected = trained.get_image_features(pixels)
        assert torch.equal(release.get_image_features(pixels), expected)
        assert torch.equal(head_only.get_image_features(pixels), expected)
        assert not torch.allclose(baseline.get_image_features(pixels), expected)  # training changed the head
    # --export-only writes the same files again from a checkpoint
    out = tmp_path / "again"
    shutil.copytree(runs / "full" / "checkpoint-8", out / "checkpoint-8")
    assert main(["--model", str(siglip_vision_dir), "--data-dir", str(dataset / "data"), "--output-dir", str(out),
                 "--resume", "latest", "--export-only", "--export", "head", "--export-dtype", "fp32", "--cpu",
                 "--report-to", "none"]) == 0
    again, _ = load_model(out / "export" / "nearid_head.safetensors", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again.get_image_features(pixels), expected)


@pytest.mark.parametrize("damage", ["zeros", "truncate"])
def test_training_refuses_a_damaged_feature_cache(runs, dataset, siglip_vision_dir, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    shutil.copytree(runs / "cache", cache)
    shards = sorted(cache.glob("*/r0/shard-*.npy"))
    for shard in shards:  # what the issue did: zero-filled (header kept) or cut short
        data = np.load(shard)
        if damage == "zeros":
            np.save(shard, np.zeros_like(data))
        else:
            shard.write_bytes(shard.read_bytes()[:-100])
    code = cli(["--model", str(siglip_vision_dir), "--data-dir", str(dataset / "data"), "--mtg-dir",
                str(dataset / "mtg"), "--mtg-repeat", "2", "--batch-size", "3", "--max-steps", "2", "--cache-dir",
                str(cache), "--cache-dtype", "fp32", "--output-dir", str(tmp_path / "run"), "--cpu", "--report-to",
                "none"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "feature cache shard " in err and "shard-0000" in err and "Delete its writer folder" in err, err
    assert ("differ from the checksums" if damage == "zeros" else "is truncated") in err
    log = tmp_path / "run" / "train_log.csv"
    assert not log.exists() or _read_csv(log) == []  # no step trained on garbage


def test_augmented_on_the_fly_training_runs(dataset, siglip_vision_dir, tmp_path):
    assert main(["--model", str(siglip_vision_dir), "--data-dir", str(dataset / "data"), "--output-dir",
                 str(tmp_path), "--batch-size", "2", "--max-steps", "2", "--augment", "--val-split", "none",
                 "--export", "none", "--cpu", "--report-to", "none", "--checkpointing-steps", "0"]) == 0
    rows = _read_csv(tmp_path / "train_log.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert not (tmp_path / "feature_cache").exists() and latest_checkpoint(tmp_path).name == "checkpoint-2"


# ====================================================================================================================
# Hub datasets (in-memory datasets.Dataset stand-ins; nothing is downloaded)
# ====================================================================================================================


@pytest.fixture
def hub(monkeypatch, dataset):
    datasets = pytest.importorskip("datasets")
    records = load_local_nearid(dataset / "data", SOURCES, "all")
    image = datasets.Image()
    pos_cols = {f"images{j + 1}": [r.views[j] and Image.open(r.views[j]) for r in records] for j in range(3)}
    positives = datasets.Dataset.from_dict(
        {"id": [int(r.identity_id[2:]) for r in records], "category": [r.category for r in records],
         "n_images": [r.n_views for r in records], **pos_cols},
        features=datasets.Features({"id": datasets.Value("int64"), "category": datasets.Value("string"),
                                    "n_images": datasets.Value("int64"), **{c: image for c in pos_cols}}))

    def negatives(source):
        cols = {f"nimg{j + 1}": [r.distractors[source][j] and Image.open(r.distractors[source][j]) for r in records]
                for j in range(3)}
        return datasets.Dataset.from_dict({"id": [int(r.identity_id[2:]) for r in records], **cols},
                                          features=datasets.Features({"id": datasets.Value("int64"),
                                                                      **{c: image for c in cols}}))

    tables = {"Aleksandar/NearID": positives, "Aleksandar/NearID-Flux": negatives("src_a"),
              "Aleksandar/NearID-Qwen": negatives("src_b")}
    mtg = load_local_mtg(dataset / "mtg")
    cols = {c: [getattr(m, a)[v] and Image.open(getattr(m, a)[v]) for m in mtg]
            for a, names in (("originals", ("image_1_original", "image_2_original")),
                             ("inpainted", ("image_1_inpainted", "image_2_inpainted"))) for v, c in enumerate(names)}
    tables["abdo-eldesokey/mtg-dataset"] = datasets.Dataset.from_dict(
        cols, features=datasets.Features({c: image for c in cols}))
    loaded = []

    def fake_load(repo, split, cache_dir=None):
        loaded.append(repo)
        return tables[repo]

    import nearid_core.data

    monkeypatch.setattr(nearid_core.data, "load_hub_dataset", fake_load)  # the one hub reader, for training and eval
    return records, tables, loaded


def test_hub_training_records_are_lazy_aligned_and_content_keyed(hub, tmp_path):
    records, tables, loaded = hub
    hub_records = load_hub_nearid_training(["flux", "qwen"], [0, 2, 5])
    assert loaded == ["Aleksandar/NearID", "Aleksandar/NearID-Flux", "Aleksandar/NearID-Qwen"]
    assert len(hub_records) == 3 and hub_records.sources == ["flux", "qwen"]
    rec = hub_records[2]
    local = records[5]
    assert rec.index == 5 and rec.identity_id == str(int(local.identity_id[2:]))
    assert all(isinstance(v, HubImage) for v in rec.views if v is not None)
    assert [v is None for v in rec.views] == [v is None for v in local.views]
    assert [v is None for v in rec.distractors["flux"]] == [v is None for v in local.distractors["src_a"]]
    assert np.array_equal(np.asarray(open_ref(rec.views[0])), np.asarray(Image.open(local.views[0]).convert("RGB")))
    cache = FeatureCache(tmp_path / "c", {"x": 1}, (2, 2))
    assert cache.key(rec.views[0]) == cache.key(rec.views[0])
    assert "hub:" in (tmp_path / "c" / "digests" / "r0.tsv").read_text()
    shuffled = tables["Aleksandar/NearID-Qwen"].select([1, 0, *range(2, len(records))])
    from nearid_core.train_data import HubNearIDRecords

    with pytest.raises(ValueError, match="not row-aligned"):
        HubNearIDRecords(tables["Aleksandar/NearID"], {"qwen": shuffled}, [0, 1])


def test_hub_training_end_to_end(hub, siglip_vision_dir, tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.json").write_text(json.dumps([0, 1, 2, 3, 4, 5]))
    (splits / "val.json").write_text(json.dumps({"indices": [6, 7]}))
    (splits / "test.json").write_text(json.dumps([5, 8, 9]))
    common = ["--model", str(siglip_vision_dir), "--hf", "--neg-sources", "flux", "qwen", "--val-sources", "flux",
              "--train-indices", str(splits / "train.json"), "--val-indices", str(splits / "val.json"),
              "--test-indices", str(splits / "test.json"), "--cpu", "--report-to", "none"]
    with pytest.raises(SplitOverlapError, match="1 rows with the test split"):
        main([*common, "--output-dir", str(tmp_path / "bad")])
    assert hub[2] == []  # refused before anything was downloaded
    (splits / "test.json").write_text(json.dumps([8, 9]))
    assert main([*common, "--output-dir", str(tmp_path / "run"), "--mtg-hf", "--batch-size", "3", "--max-steps", "3",
                 "--export", "none"]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["data"]["n_nearid"] == 6 and summary["data"]["n_mtg"] == 3 and summary["data"]["n_samples"] == 18
    assert [v["step"] for v in summary["validation"]] == [0, 3]


# ====================================================================================================================
# The offline demo
# ====================================================================================================================


def test_demo_beats_the_frozen_baseline_on_held_out_identities(tmp_path):
    from nearid_core.demo import run_demo

    summary = run_demo(tmp_path / "demo", "ci", seed=0)
    base, trained = summary["baseline"], summary["nearid"]
    assert base["n"] == trained["n"] == summary["test_identities"] * 3
    assert trained["PA"] > base["PA"] and trained["SSR"] >= base["SSR"], summary  # NearID beats the frozen head
    held_out = summary["held_out_sources"][0]
    assert trained["per_source"][held_out]["PA"] > base["per_source"][held_out]["PA"]  # generalises to a new source
    assert (tmp_path / "demo" / "embedding_kpca.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["nearid"]["PA"] == trained["PA"]
    (tmp_path / "not_a_demo").mkdir()
    (tmp_path / "not_a_demo" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        run_demo(tmp_path / "not_a_demo", "ci")
    assert (tmp_path / "not_a_demo" / "precious.txt").exists()
