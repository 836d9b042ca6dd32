"""grain pipeline: static shapes, both views, determinism, sharding, exact resume, bad records."""

import os
import signal

import numpy as np
import pytest

from tests.fixtures_data import encode_image, write_geometry3k, write_virl39k_raw
from tests.release_reference import mode_image, release_views
from vaopd_jax import config as config_lib
from vaopd_jax.data import pipeline as PL
from vaopd_jax.data import processor as P
from vaopd_jax.data import sources as S
from vaopd_jax.data.synthetic import SyntheticSource
from vaopd_jax.data.tokenizer import load_tokenizer

SMALL = dict(min_pixels=32 * 32, max_pixels=64 * 64, prompt_buckets=(32, 64, 128), prompt_patch_buckets=(16, 32, 64))
# The models reading the batches: the real special ids and merge size, a tiny vision position grid.
MODEL = config_lib.model_config_from_spec(config_lib.tiny_spec(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                                               vision_depth=1, vision_hidden=32))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _config(**overrides):
    base = dict(batch_size=4, seed=7, num_epochs=1, shard_index=0, shard_count=1, **SMALL)
    base.update(overrides)
    return PL.PipelineConfig(**base)


def _iterator(source, config, tok):
    return PL.make_iterator(source, config, tokenizer=tok, model_config=MODEL)


def _ids(iterator):
    return [tuple(batch.id) for batch in iterator]


def test_batch_layout_both_views_and_static_shapes(tok):
    source = SyntheticSource(num_records=8, seed=2, image_size=64)
    batch = next(_iterator(source, _config(shuffle=False), tok))
    assert batch.input_ids.shape == (4, 32) and batch.input_ids.dtype == np.int32
    # Each prompt's image rows, padded to the per-prompt patch bucket (16 rows: one 4x4-patch image).
    assert batch.pixel_values.shape == (4, 16, 1536) and batch.pixel_values_pixelated.shape == (4, 16, 1536)
    assert batch.image_grid_thw.shape == (4, 1, 3)  # images-per-prompt bucket 1
    np.testing.assert_array_equal(batch.image_grid_thw, [[[1, 4, 4]]] * 4)
    assert int(batch.images_per_prompt.sum()) == 4 and int(batch.num_patches.sum()) == 64
    # Positions and vision inputs computed once, here: equal to get_rope_index / prepare_vision_inputs.
    from vaopd_jax.models import qwen3_vl

    positions, deltas = qwen3_vl.get_rope_index(batch.input_ids, np.tile([[1, 4, 4]], (4, 1)),
                                                batch.attention_mask, MODEL)
    np.testing.assert_array_equal(batch.position_ids, positions)
    np.testing.assert_array_equal(batch.rope_deltas, deltas)
    vision = qwen3_vl.prepare_vision_inputs([[1, 4, 4]], MODEL, pad_patches_to=16)
    for got, want in zip(batch.vision_inputs, vision):
        np.testing.assert_array_equal(got, np.stack([want] * 4))
    for b in range(4):
        record = source[b]
        ids, types = P.build_prompt(tok, record["question"], [(1, 4, 4)])
        n = len(ids)
        assert batch.prompt_lengths[b] == n and batch.attention_mask[b].sum() == n
        np.testing.assert_array_equal(batch.input_ids[b, :n], ids)
        assert (batch.input_ids[b, n:] == tok.pad_token_id).all()
        np.testing.assert_array_equal(batch.input_ids[b, :n] == MODEL.image_token_id, types == P.TOKEN_TYPE_IMAGE)
        rows, _ = P.preprocess_image(record["images"][0], 32 * 32, 64 * 64)
        rows_pix, _ = P.preprocess_image(P.pixelate(record["images"][0]), 32 * 32, 64 * 64)
        np.testing.assert_array_equal(batch.pixel_values[b], rows)
        np.testing.assert_array_equal(batch.pixel_values_pixelated[b], rows_pix)
        assert batch.answer[b] == record["answer"] and batch.kind[b] == record["kind"]
    assert not np.array_equal(batch.pixel_values, batch.pixel_values_pixelated)


@pytest.mark.parametrize("image_path", ["release", "single_resize"])
def test_featurize_gives_the_releases_views_for_every_mode_and_size(tok, image_path):
    """Images below / inside / above the bounds in RGB, RGBA, L, P, P+transparency and 1-bit, stored as PNG
    (modes survive): the pipeline's rows and grids equal the release's two views run through the processor
    (image_path="release"), or the older path (pixelate the decoded image, one resize) when asked for."""
    bounds = dict(min_pixels=4096, max_pixels=16384)
    featurize = PL.Featurize(_config(prompt_buckets=(256,), image_path=image_path, **bounds), tokenizer=tok)
    checked = 0
    for height, width in ((25, 37), (70, 90), (151, 209)):
        for mode in ("RGB", "RGBA", "L", "P", "P+transparency", "1"):
            image = mode_image(height, width, mode, seed=height * width)
            record = {"id": f"{mode}-{height}", "question": "<image>What is shown?", "answer": "1",
                      "images": [{"bytes": encode_image(image), "path": None}]}
            example = featurize(record)
            assert "skip" not in example, example
            if image_path == "release":
                original, pixelated = release_views(image, 0.1, **bounds)
            else:
                decoded = S.load_image(record["images"][0])
                original, pixelated = decoded, P.pixelate(P._continuous_mode(decoded), 0.1)
            rows, grid = P.preprocess_image(original, **bounds)
            rows_pix, grid_pix = P.preprocess_image(pixelated, **bounds)
            np.testing.assert_array_equal(example["image_grid_thw"], [grid])
            np.testing.assert_array_equal(grid, grid_pix)
            np.testing.assert_array_equal(example["pixel_values"], rows)
            np.testing.assert_array_equal(example["pixel_values_pixelated"], rows_pix)
            checked += 1
    assert checked == 18
    with pytest.raises(ValueError, match="image_path"):
        _config(image_path="twice").validate()
    with pytest.raises(ValueError, match="pixelation_ratio"):
        _config(pixelation_ratio=True).validate()


def test_same_seed_same_batches_other_seed_other_order(tok):
    source = SyntheticSource(num_records=16, seed=0, image_size=64)
    first = _ids(_iterator(source, _config(seed=5), tok))
    again = _ids(_iterator(source, _config(seed=5), tok))
    other = _ids(_iterator(source, _config(seed=6), tok))
    assert first == again and len(first) == 4
    assert first != other
    assert sorted(sum(first, ())) == sorted(sum(other, ())) == sorted(f"synthetic-0-{i}" for i in range(16))
    # two epochs: each epoch is a full pass, in a different order
    two = _ids(_iterator(source, _config(seed=5, num_epochs=2), tok))
    assert two[:4] == first and sorted(sum(two[4:], ())) == sorted(sum(first, ())) and two[4:] != first


def test_process_shards_are_disjoint_and_cover_the_data(tok):
    source = SyntheticSource(num_records=18, seed=1, image_size=64)
    shards = [
        set(sum(_ids(_iterator(source, _config(shard_index=i, shard_count=2, batch_size=3), tok)), ()))
        for i in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 9
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == {f"synthetic-1-{i}" for i in range(18)}


def test_epochs_of_full_batches_drop_the_remainder_of_each_epoch(tok):
    """epoch_size (the release's DataLoader drop_last): each epoch reads the first 8 of its own permutation of
    the 10 records, so every epoch has 2 whole batches of 4 and no batch mixes two epochs."""
    import grain

    source = SyntheticSource(num_records=10, seed=4, image_size=64)
    batches = _ids(_iterator(source, _config(num_epochs=3, epoch_size=8, batch_size=4), tok))
    assert len(batches) == 6
    order = grain.MapDataset.range(10).shuffle(seed=7).repeat(3)  # the pipeline's permutations (seed 7)
    for epoch in range(3):
        want = [f"synthetic-4-{order[10 * epoch + i]}" for i in range(8)]
        assert list(batches[2 * epoch] + batches[2 * epoch + 1]) == want
    assert len({frozenset(batches[2 * e] + batches[2 * e + 1]) for e in range(3)}) > 1  # other drops per epoch
    # the old single stream carries the leftovers into the next epoch's batches
    stream = _ids(_iterator(source, _config(num_epochs=3, batch_size=4), tok))
    assert len(stream) == 7 and stream[:6] != batches
    with pytest.raises(ValueError, match="epoch_size=11 exceeds the 10 records"):
        _iterator(source, _config(epoch_size=11), tok)
    # resumable across an epoch boundary
    reference = _iterator(source, _config(num_epochs=None, epoch_size=8, batch_size=4), tok)
    next(reference)
    state = reference.get_state()
    expected = [tuple(next(reference).id) for _ in range(4)]
    restored = _iterator(source, _config(num_epochs=None, epoch_size=8, batch_size=4), tok)
    restored.set_state(state)
    assert [tuple(next(restored).id) for _ in range(4)] == expected


def test_restored_iterator_continues_with_identical_batches(tok, tmp_path):
    source = SyntheticSource(num_records=24, seed=3, image_size=64)
    config = _config(num_epochs=None, batch_size=3)
    reference = _iterator(source, config, tok)
    for _ in range(3):
        next(reference)
    state = reference.get_state()
    expected = [next(reference) for _ in range(10)]  # crosses the epoch boundary (8 batches / epoch)

    restored = _iterator(source, config, tok)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert list(got.id) == list(want.id)
        for key in ("input_ids", "pixel_values", "pixel_values_pixelated", "image_grid_thw", "position_ids"):
            np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
    assert restored.counters.batches == 13

    # through grain's Orbax handler, as the trainer's checkpoint manager stores it
    import orbax.checkpoint as ocp
    import grain

    fresh = _iterator(source, config, tok)
    for _ in range(5):
        next(fresh)
    want = next(fresh)  # the 6th batch
    saved = _iterator(source, config, tok)
    for _ in range(5):
        next(saved)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mgr:
        mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(saved)))
        mgr.wait_until_finished()
        target = _iterator(source, config, tok)
        mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(target)))
    assert list(next(target).id) == list(want.id)


def test_bad_records_are_skipped_counted_and_logged_once(tok, tmp_path, caplog):
    write_geometry3k(tmp_path / "g", "train", num_rows=12, image_size=(60, 50),
                     corrupt_rows=[1], empty_question_rows=[4], missing_answer_rows=[6], long_question_rows=[9])
    source = S.Geometry3KSource(tmp_path / "g", "train")
    config = _config(batch_size=2, num_epochs=2, prompt_buckets=(64, 128, 256))
    with caplog.at_level("WARNING", logger="vaopd_jax.data.pipeline"):
        iterator = _iterator(source, config, tok)
        batches = list(iterator)
    delivered = sum(int(b.example_mask.sum()) for b in batches)
    assert delivered == 2 * 8 and len(batches) == 8
    counts = iterator.counters.counts
    assert counts["undecodable_image"] == 2 and counts["empty_question"] == 2
    assert counts["missing_field"] == 2 and counts["prompt_too_long"] == 2 and iterator.counters.skipped == 8
    assert iterator.counters.as_dict()["data/skipped"] == 8
    bad_ids = {f"geometry3k-train-{i}" for i in (1, 4, 6, 9)}
    for record_id in bad_ids:  # logged once although seen in both epochs
        assert sum(record_id in r.getMessage() for r in caplog.records) == 1
    assert not bad_ids & {i for b in batches for i in b.id}


def test_missing_image_file_and_multi_image_rows(tok, tmp_path):
    write_virl39k_raw(tmp_path, num_rows=5, image_size=(70, 50), multi_image_rows=(1, 3), missing_file_rows=(2,))
    source = S.ViRL39KSource(tmp_path / "39Krelease.parquet")
    iterator = _iterator(source, _config(batch_size=4, shuffle=False, drop_remainder=False), tok)
    batch = next(iterator)
    assert iterator.counters.counts["missing_image_file"] == 1
    assert list(batch.id) == ["virl-0-0", "virl-0-1", "virl-0-3", "virl-0-4"]
    np.testing.assert_array_equal(batch.images_per_prompt, [1, 2, 2, 1])
    assert int(batch.images_per_prompt.sum()) == 6 and batch.image_grid_thw.shape == (4, 2, 3)  # bucket 2
    assert (batch.image_grid_thw[[0, 3], 1] == 0).all()
    for b in range(4):
        rows = int(np.prod(batch.image_grid_thw[b], axis=1).sum())
        assert int(batch.num_patches[b]) == rows and (batch.pixel_values[b, rows:] == 0).all()
        assert batch.vision_inputs.valid[b].sum() == rows
    # each image's <|image_pad|> count matches its grid, in order
    assert int((batch.input_ids[1] == 151655).sum()) == int(np.prod(batch.image_grid_thw[1], axis=1).sum()) // 4
    with pytest.raises(StopIteration):
        next(iterator)


def test_partial_final_batch_is_padded_with_mask(tok):
    source = SyntheticSource(num_records=5, seed=4, image_size=64)
    batches = list(_iterator(source, _config(batch_size=4, drop_remainder=False), tok))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1].example_mask, [True, False, False, False])
    assert batches[1].input_ids.shape == (4, 32) and batches[1].id[1] == ""
    assert batches[1].without_filler().input_ids.shape == (1, 32)
    assert len(list(_iterator(source, _config(batch_size=4), tok))) == 1


def _child_pids():
    import glob

    pids = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def test_worker_processes_give_the_same_batches(tok):
    """... and survive a Ctrl-C / job-wide SIGTERM sent to every process (the trainer then stops cleanly)."""
    source = SyntheticSource(num_records=8, seed=9, image_size=64)
    single = list(_iterator(source, _config(), tok))
    before = set(_child_pids())
    iterator = _iterator(source, _config(num_workers=1), tok)
    multi = [next(iterator)]
    workers = set(_child_pids()) - before
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    multi += list(iterator)
    iterator.close()
    assert [list(b.id) for b in multi] == [list(b.id) for b in single]
    np.testing.assert_array_equal(multi[1].pixel_values_pixelated, single[1].pixel_values_pixelated)


def test_bucket_rules_and_config_errors():
    assert PL.pick_bucket(5, (4, 8)) == 8 and PL.pick_bucket(8, (4, 8)) == 8 and PL.pick_bucket(9, (4, 8)) == 16
    with pytest.raises(ValueError, match="prompt_buckets"):
        PL.PipelineConfig(prompt_buckets=(64, 32)).validate()
    with pytest.raises(ValueError, match="batch_size"):
        PL.PipelineConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="shard_index"):
        PL.PipelineConfig(shard_index=2, shard_count=2).validate()
    with pytest.raises(ValueError, match="multiples of 4"):
        PL.PipelineConfig(prompt_patch_buckets=(6, 8)).validate()


def _global_batches(source, tok, processes, steps, states=None, **overrides):
    """`steps` global batches of 4 prompts read by `processes` processes (sorted ids), and their states after.

    ``states``: all processes' states of a run with another process count to resume from.
    """
    iterators = []
    for i in range(processes):
        config = _config(batch_size=4 // processes, num_epochs=None, shard_index=i, shard_count=processes,
                         **overrides)
        iterators.append(_iterator(source, config, tok))
        if states is not None:
            iterators[-1].note = iterators[-1].set_state_from_processes(states)
    batches = [sorted(i for it in iterators for i in next(it).id) for _ in range(steps)]
    return batches, [it.get_state() for it in iterators], iterators


def test_process_count_change_resumes_the_global_stream_exactly(tok):
    """Global batches hold the same prompts with 1, 2 or 4 processes, and a resume on another count continues them."""
    source = SyntheticSource(num_records=10, seed=2, image_size=32)
    reference, _, _ = _global_batches(source, tok, 1, 7)  # crosses an epoch boundary (10 records)
    two, _, _ = _global_batches(source, tok, 2, 7)
    assert two == reference and all(len(b) == 4 for b in reference)
    assert any(len(set(b)) < 4 for b in reference)  # a batch across the epoch boundary holds a record twice
    # Epochs of full global batches (the release's drop_last): the same with 1 and 2 processes.
    full_epochs, _, _ = _global_batches(source, tok, 1, 4, epoch_size=8)
    assert _global_batches(source, tok, 2, 4, epoch_size=8)[0] == full_epochs != reference[:4]
    _, states2, _ = _global_batches(source, tok, 2, 1, epoch_size=8)  # ... and resume on another count
    assert _global_batches(source, tok, 1, 3, states=states2, epoch_size=8)[0] == full_epochs[1:]

    _, states2, _ = _global_batches(source, tok, 2, 3)  # 2 processes stop after 3 steps
    on1, states1, its = _global_batches(source, tok, 1, 2, states=states2)  # resumed on 1 process
    assert on1 == reference[3:5]
    assert its[0].note.endswith("resumes at record 12 (exact)")
    on4, _, _ = _global_batches(source, tok, 4, 2, states=states1)  # and on to 4 processes
    assert on4 == reference[5:7]
    # A later resume on the same count (set_state) reopens the stream where the re-derived slice started.
    again = _iterator(source, _config(batch_size=4, num_epochs=None), tok)
    again.set_state(states1[0])
    assert sorted(next(again).id) == reference[5]


def test_process_count_change_after_skipped_records_reads_some_again(tok, tmp_path):
    write_geometry3k(tmp_path / "g", "train", num_rows=12, image_size=(60, 50), corrupt_rows=[1, 3])
    source = S.Geometry3KSource(tmp_path / "g", "train")
    _, states2, _ = _global_batches(source, tok, 2, 2, shuffle=False, prompt_buckets=(64, 128, 256))
    pulled = [s["records"] for s in states2]
    assert pulled == [4, 6]  # process 1 read both bad records (rows 1 and 3)
    _, _, its = _global_batches(source, tok, 1, 1, states=states2, shuffle=False, prompt_buckets=(64, 128, 256))
    again = abs(pulled[0] - pulled[1])
    assert f"{again} records that some of them had read past it" in its[0].note
    assert its[0].counters.counts["undecodable_image"] == 2  # both processes' skips, summed on process 0
