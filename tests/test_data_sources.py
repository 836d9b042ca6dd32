"""Sources over fixture files in the public formats: Geometry3K, ViRL39K raw / embedded, validation subset."""

import pickle
import random

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_data import write_geometry3k, write_virl39k_embedded, write_virl39k_raw
from vaopd_jax.data import sources as S


def test_geometry3k_reads_hf_layout_across_shards(tmp_path):
    write_geometry3k(tmp_path, "train", num_rows=7, num_shards=3, image_size=(100, 80))
    source = S.Geometry3KSource(tmp_path, split="train")
    assert len(source) == 7
    rec = source[5]
    assert rec["id"] == "geometry3k-train-5"
    assert rec["question"] == "<image>Find x. Problem 5: AB = 7, BC = 13."
    assert rec["answer"] == "7 \\sqrt { 13 }"
    image = S.load_image(rec["images"][0])
    assert isinstance(image, Image.Image) and image.size == (100 + (5 * 37) % 50, 80 + (5 * 23) % 40)
    # picklable by path (grain workers) and still readable after unpickling
    clone = pickle.loads(pickle.dumps(source))
    assert clone[5]["answer"] == rec["answer"]


def test_geometry3k_uses_id_column_when_present(tmp_path):
    write_geometry3k(tmp_path, "test", num_rows=3, with_id=True)
    assert S.Geometry3KSource(tmp_path, split="test")[2]["id"] == "g3k-test-2"


def test_validation_subset_rule(tmp_path):
    expected = sorted(random.Random(42).sample(range(300), 200))
    assert S.geometry3k_validation_indices() == expected
    write_geometry3k(tmp_path, "validation", num_rows=300, image_size=(40, 40))
    source = S.geometry3k_validation_source(tmp_path)
    assert len(source) == 200
    assert source[0]["id"] == f"geometry3k-validation-{expected[0]}"
    assert source[199]["question"].startswith(f"<image>Find x. Problem {expected[199]}:")
    write_geometry3k(tmp_path / "small", "validation", num_rows=10, image_size=(40, 40))
    with pytest.raises(ValueError, match="needs the full 300"):
        S.geometry3k_validation_source(tmp_path / "small")


def test_missing_files_and_columns_fail_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.Geometry3KSource(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="validation"):
        S.Geometry3KSource(tmp_path, split="validation")
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["<image>x"], "solution": ["1"]}), str(bad))
    with pytest.raises(ValueError, match=r"lacks columns \['images', 'answer'\]") as err:
        S.Geometry3KSource(bad)
    assert "bad.parquet" in str(err.value)
    with pytest.raises(ValueError, match="matches no ViRL39K layout"):
        S.ViRL39KSource(bad)


def test_virl39k_raw_layout_with_multi_image_rows(tmp_path):
    write_virl39k_raw(tmp_path, num_rows=4, multi_image_rows=(1,))
    source = S.ViRL39KSource(tmp_path / "39Krelease.parquet")
    assert source.layout == "raw" and len(source) == 4
    rec = source[1]
    assert rec["id"] == "virl-0-1" and rec["answer"] == "2" and rec["kind"] == "Tables/Diagrams/Charts"
    assert rec["question"].count("<image>") == 2 and len(rec["images"]) == 2
    assert S.ViRL39KSource(tmp_path)[1]["images"] == rec["images"]  # the release folder works too
    images = [S.load_image(e) for e in rec["images"]]
    assert [im.size for im in images] == [(200, 160), (210, 160)]


def test_virl39k_embedded_layout(tmp_path):
    write_virl39k_embedded(tmp_path, num_rows=3, multi_image_rows=(2,))
    source = S.ViRL39KSource(tmp_path)
    assert source.layout == "embedded"
    assert source[1]["answer"] == "3" and len(source[2]["images"]) == 2
    assert np.asarray(S.load_image(source[2]["images"][1])).shape == (160, 200, 3)


def test_load_image_errors_and_strip_boxed(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.load_image("images/missing.jpg", root=tmp_path)
    with pytest.raises(Exception):
        S.load_image(b"not an image")
    with pytest.raises(ValueError, match="neither bytes nor path"):
        S.load_image({"bytes": None, "path": None})
    assert S.strip_boxed("\\boxed{\\frac{3}{2}}") == "\\frac{3}{2}"
    assert S.strip_boxed("\\boxed{1} and \\boxed{2}") == "\\boxed{1} and \\boxed{2}"
    assert S.strip_boxed("12") == "12"
