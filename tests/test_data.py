"""Dataset records: local folder layout, hub datasets (built in memory), split index lists and the fg mask cleaning."""

import json

import numpy as np
import pytest
from PIL import Image

from nearid_core import data
from nearid_core.data import (
    DatasetLayoutError,
    HFMTGRecords,
    HFNearIDRecords,
    apply_mask,
    clean_mask,
    hf_source_repo,
    load_local_mtg,
    load_local_nearid,
    load_split_indices,
    local_split,
)
from nearid_core.synthetic import write_dataset, write_mtg


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    info = write_dataset(root, 5, n_views=(2, 3), image_size=24, sources=("src_a", "src_b"),
                         splits={"train": 3, "test": 2}, missing_rate=0.3, seed=3)
    return root, info


# ---------------------------------------------------------------------------------------------------------------------
# split index lists
# ---------------------------------------------------------------------------------------------------------------------


def test_load_split_indices_list_and_dict(tmp_path):
    (tmp_path / "a.json").write_text("[4, 0, 2]")
    (tmp_path / "b.json").write_text('{"indices": [1, 3]}')
    assert load_split_indices(tmp_path / "a.json") == [4, 0, 2]
    assert load_split_indices(tmp_path / "b.json") == [1, 3]


@pytest.mark.parametrize("text, message", [
    ("[1, 2, 1]", "duplicate"),
    ("[1, -2]", "non-negative"),
    ('[1, "x"]', "non-negative"),
    ('{"rows": [1]}', "indices"),
    ("3", "JSON list"),
])
def test_load_split_indices_rejects(tmp_path, text, message):
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(DatasetLayoutError, match=message):
        load_split_indices(tmp_path / "s.json")


# ---------------------------------------------------------------------------------------------------------------------
# local folder layout
# ---------------------------------------------------------------------------------------------------------------------


def test_local_records_are_slot_aligned(local_ds):
    root, info = local_ds
    records = load_local_nearid(root, split="all")
    assert [r.identity_id for r in records] == [f"id{k:04d}" for k in range(5)]
    assert sorted({r.n_views for r in records}) == sorted(info["views_histogram"])
    meta = json.loads((root / "metadata.json").read_text())
    for r in records:
        assert r.category == meta[r.identity_id]["category"]
        assert r.index == int(r.identity_id[2:])
        for j in range(3):
            view = root / "identities" / r.identity_id / f"view{j + 1}.png"
            assert r.views[j] == (view if view.exists() else None)
            assert (r.masks[j] is None) == (r.views[j] is None)
            for s in ("src_a", "src_b"):
                d = root / "distractors" / s / r.identity_id / f"view{j + 1}.png"
                assert r.distractors[s][j] == (d if d.exists() else None)
    n_dist = {s: sum(x is not None for r in records for x in r.distractors[s]) for s in ("src_a", "src_b")}
    assert n_dist == info["n_distractors"]


def test_local_split_by_name_ids_and_positions(local_ds, tmp_path):
    root, _ = local_ds
    test_ids = json.loads((root / "splits" / "test.json").read_text())
    assert [r.identity_id for r in load_local_nearid(root, ["src_b"], "test")] == test_ids
    (tmp_path / "pos.json").write_text('{"indices": [4, 1]}')
    assert local_split(root, tmp_path / "pos.json") == ["id0001", "id0004"]  # sorted identity order
    (tmp_path / "dup.json").write_text('["id0001", 1]')
    with pytest.raises(DatasetLayoutError, match="twice"):
        local_split(root, tmp_path / "dup.json")
    with pytest.raises(DatasetLayoutError, match="available"):
        local_split(root, "nope")
    with pytest.raises(DatasetLayoutError, match="unknown distractor source"):
        load_local_nearid(root, ["src_z"])


def test_local_mtg(tmp_path):
    write_mtg(tmp_path, 3, image_size=24)
    records = load_local_mtg(tmp_path)
    assert [r.sample_id for r in records] == ["mtg0000", "mtg0001", "mtg0002"]
    r = records[1]
    assert r.originals[1] == tmp_path / "mtg0001" / "image_2_original.png"
    assert r.part_masks[0] == tmp_path / "mtg0001" / "image_1_part_mask.png"
    with pytest.raises(DatasetLayoutError):
        load_local_mtg(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------------
# hub datasets (in-memory stand-ins with the real column names)
# ---------------------------------------------------------------------------------------------------------------------


def _img(value):
    return Image.fromarray(np.full((6, 6, 3), value, np.uint8))


def _hf_datasets():
    datasets = pytest.importorskip("datasets")
    image = datasets.Image()
    pos = datasets.Dataset.from_dict(
        {"id": [7, 9, 12], "category": ["mug", "cat", "car"],
         "images1": [_img(1), _img(2), _img(3)], "images2": [_img(4), _img(5), _img(6)],
         "images3": [_img(7), _img(99), None], "masks1": [_img(255)] * 3, "n_images": [3, 2, 2],
         "split": ["train", "test", "test"]},
        features=datasets.Features({"id": datasets.Value("int64"), "category": datasets.Value("string"),
                                    "images1": image, "images2": image, "images3": image, "masks1": image,
                                    "n_images": datasets.Value("int64"), "split": datasets.Value("string")}))
    neg = datasets.Dataset.from_dict(
        {"id": [7, 9, 12], "nimg1": [_img(11), None, _img(13)], "nimg2": [_img(14), _img(15), _img(16)]},
        features=datasets.Features({"id": datasets.Value("int64"), "nimg1": image, "nimg2": image}))
    return datasets, pos, neg


def _value(img):
    return None if img is None else int(np.asarray(img)[0, 0, 0])


def test_hf_records_join_rows_and_keep_slots(caplog):
    datasets, pos, neg = _hf_datasets()
    records = HFNearIDRecords(pos, {"flux": neg}, indices=[2, 1])
    assert len(records) == 2
    with caplog.at_level("WARNING", logger="nearid_core"):
        first, second = records[0], records[1]
    assert (first.identity_id, first.category, first.index) == ("12", "car", 2)
    assert [_value(v) for v in first.views] == [3, 6, None]
    assert [_value(v) for v in first.distractors["flux"]] == [13, 16, None]
    assert (first.n_images, first.n_images_disagrees) == (2, False)
    # as the reference: every present image is used, so n_images = 2 does not hide the third image (it used to);
    # the disagreement is kept on the record and warned about. A missing nimg1 stays a hole in slot 0.
    assert [_value(v) for v in second.views] == [2, 5, 99]
    assert (second.n_images, second.n_views, second.n_images_disagrees) == (2, 3, True)
    assert "row 1 (id 9) declares n_images=2 but has 3 views; every present view is used" in caplog.text
    assert [_value(v) for v in second.distractors["flux"]] == [None, 15, None]
    assert _value(second.masks[0]) == 255 and second.masks[1] is None


def test_hf_records_fail_on_misalignment():
    datasets, pos, neg = _hf_datasets()
    shuffled = neg.select([1, 0, 2])
    with pytest.raises(DatasetLayoutError, match="row 0 has id 9"):
        HFNearIDRecords(pos, {"flux": shuffled})
    with pytest.raises(DatasetLayoutError, match="2 rows"):
        HFNearIDRecords(pos, {"flux": neg.select([0, 1])})
    with pytest.raises(DatasetLayoutError, match="outside"):
        HFNearIDRecords(pos, {"flux": neg}, indices=[3])


def test_load_hf_nearid_uses_split_column_or_index_list(monkeypatch, tmp_path):
    datasets, pos, neg = _hf_datasets()
    calls = []

    def fake_load(repo, split, cache_dir=None):
        calls.append((repo, split))
        return pos if repo == "Aleksandar/NearID" else neg

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records = data.load_hf_nearid(["Flux_1024", "qwen"], split="test")
    assert calls == [("Aleksandar/NearID", "train"), ("Aleksandar/NearID-Flux_1024", "train"),
                     ("Aleksandar/NearID-Qwen", "train")]
    assert records.sources == ["flux_1024", "qwen"] and records.indices == [1, 2]
    (tmp_path / "test.json").write_text('{"indices": [0]}')
    assert data.load_hf_nearid(["flux"], indices=tmp_path / "test.json").indices == [0]
    with pytest.raises(DatasetLayoutError, match="split == 'val'"):
        data.load_hf_nearid(["flux"], split="val")


def test_eval_and_training_read_the_hub_through_one_reader(monkeypatch, caplog):
    """The benchmark loader and the training loader build the same reader class, so a record rule (here: n_images
    never hides a view, and a disagreement is flagged and warned about) is the same in both; only the cells differ
    (decoded PIL images for eval, unread HubImage references for training)."""
    from nearid_core.feature_cache import HubImage, open_ref
    from nearid_core.train_data import HubNearIDRecords, load_hub_nearid_training

    datasets, pos, neg = _hf_datasets()
    monkeypatch.setattr(data, "load_hub_dataset", lambda repo, split, cache_dir=None: pos if repo == data.NEARID_REPO
                        else neg)
    evaluated = data.load_hf_nearid(["flux"], indices=[0, 1, 2])
    trained = load_hub_nearid_training(["flux"], [0, 1, 2])
    assert type(evaluated) is type(trained) is HubNearIDRecords is data.HFNearIDRecords
    for reader in (evaluated, trained):
        caplog.clear()
        with caplog.at_level("WARNING", logger="nearid_core"):
            records = list(reader)
        assert "row 1 (id 9) declares n_images=2 but has 3 views" in caplog.text
        assert [(r.identity_id, r.n_views, r.n_images_disagrees) for r in records] == [
            ("7", 3, False), ("9", 3, True), ("12", 2, False)]
    for e, t in zip(evaluated, trained):
        assert all(isinstance(v, HubImage) for v in t.views + t.distractors["flux"] if v is not None)
        assert [_value(v) for v in e.views] == [None if v is None else _value(open_ref(v)) for v in t.views]
        assert [_value(v) for v in e.distractors["flux"]] == [
            None if v is None else _value(open_ref(v)) for v in t.distractors["flux"]]
        assert t.masks == [None] * 3 and e.masks[0] is not None  # training reads no masks


def test_hf_source_names():
    assert hf_source_repo("flux_1024") == ("flux_1024", "Aleksandar/NearID-Flux_1024")
    assert hf_source_repo("PowerPaint") == ("powerpaint", "Aleksandar/NearID-PowerPaint")
    assert hf_source_repo("me/NearID-SDXL") == ("sdxl", "me/NearID-SDXL")
    with pytest.raises(DatasetLayoutError, match="known"):
        hf_source_repo("dalle")


def test_hf_mtg_records():
    datasets = pytest.importorskip("datasets")
    image = datasets.Image()
    cols = ["image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted",
            "image_1_object_mask", "image_2_object_mask", "image_1_part_mask", "image_2_part_mask"]
    ds = datasets.Dataset.from_dict({c: [_img(k), _img(k + 10)] for k, c in enumerate(cols)},
                                    features=datasets.Features({c: image for c in cols}))
    rec = HFMTGRecords(ds)[1]
    assert rec.sample_id == "1"
    assert [_value(v) for v in rec.originals + rec.inpainted + rec.object_masks + rec.part_masks] == list(range(10, 18))


# ---------------------------------------------------------------------------------------------------------------------
# fg masks
# ---------------------------------------------------------------------------------------------------------------------


def test_clean_mask_exact_trivial_cases():
    assert not np.asarray(clean_mask(np.zeros((20, 30), np.uint8))).any()
    assert (np.asarray(clean_mask(np.full((20, 30), 255, np.uint8))) == 255).all()
    # a lone 1-px speck: blurred to 255 * 36 / 256 = 36 > 10 at the centre, but 3x3 is erased by the 5x5 opening
    speck = np.zeros((20, 20), np.uint8)
    speck[10, 10] = 255
    assert not np.asarray(clean_mask(speck)).any()


def test_clean_mask_keeps_largest_component_and_fills_holes():
    m = np.zeros((60, 60), np.uint8)
    m[5:35, 5:35] = 200  # 30 x 30 object ...
    m[14:26, 14:26] = 0  # ... with a 12 x 12 hole that survives the 5x5 closing
    m[45:55, 45:55] = 255  # a smaller separate blob
    m[2, 50] = 255  # a speck
    out = np.asarray(clean_mask(Image.fromarray(m)))
    assert set(np.unique(out)) <= {0, 255}
    keep = out > 0
    assert keep[5:35, 5:35].all()  # the object, hole filled
    assert not keep[40:, 40:].any() and not keep[:5, 45:].any()  # other blob and speck removed
    assert keep.sum() < 36 * 36  # the blur grows edges by at most 2 px


def test_apply_mask_blackens_background_and_resizes_mask():
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 255  # upper-left quarter, nearest-resized to 8x8
    out = np.asarray(apply_mask(img, mask))
    assert (out[:4, :4] == 200).all() and (out[4:] == 0).all() and (out[:, 4:] == 0).all()
