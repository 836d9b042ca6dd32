"""grain input pipeline: records -> padded, bucketed batches holding BOTH image views.

    MapDataset.source(src) -> shard by process -> shuffle(seed) -> repeat(epochs)
      -> map(featurize)          per record: decode, bound + RGB, pixelate, preprocess both views, prompt
      -> to_iter_dataset -> mp_prefetch(workers)      (optional worker processes)
      -> PromptBatchIterator     main process: skip + count bad records, bucket, pad, batch

Batching runs after the worker processes, so the batches (and the counters) do not depend on the
number of workers. The iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` and
grain's Orbax handlers (`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume exactly.

Each batch is a `data.batch.PromptBatch` (see its docstring for every field's shape and padding rule):
prompts right-padded to a prompt bucket (`prompt_buckets`), each prompt's images (both views) padded to a
per-prompt patch bucket (`prompt_patch_buckets`), MRoPE position ids and per-prompt vision-tower inputs
computed once here, with the model config given to `make_iterator`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from vaopd_jax.data import batch as batch_lib
from vaopd_jax.data import processor
from vaopd_jax.data.batch import PromptBatch
from vaopd_jax.data.sources import UNREADABLE, ImageTooLargeError, load_image

logger = logging.getLogger(__name__)
# grain runs the map in several threads; importing transformers / loading the tokenizer from two
# threads at once breaks transformers' lazy imports, so the first load is serialized.
_TOKENIZER_LOCK = threading.Lock()

# Why a record is skipped (counted per reason: data/skipped/<reason>, logged once per record id).
SKIP_REASONS = (
    "unreadable_row",  # its parquet row group cannot be read (sources.ParquetRows)
    "missing_field",  # id / question / answer / images is null or absent
    "empty_question",
    "bad_question",  # the tokenizer cannot encode it (e.g. unpaired UTF-16 surrogates)
    "empty_answer",
    "no_image",
    "missing_image_file",
    "undecodable_image",  # corrupt or truncated bytes, an unknown format
    "image_too_large",  # more pixels than PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb)
    "bad_image",  # decodes, but the processor refuses it (aspect ratio > 200)
    "placeholder_mismatch",
    "prompt_too_long",
)
# Images that are kept but converted (counted per kind: data/converted/<kind>): processor.IMAGE_NOTES.
CONVERSIONS = processor.IMAGE_NOTES


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline settings (all sizes static so each bucket compiles once).

    prompt_buckets: allowed padded prompt lengths; the largest is the prompt-length limit.
    prompt_patch_buckets: allowed padded patch-row counts of ONE prompt's images (both views use the same;
      multiples of merge^2 = 4). A prompt needing more rows than the largest bucket is padded to the next
      power of two (logged: it costs one extra compilation).
    """

    batch_size: int = 16
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever
    # Records read from each epoch's permutation of the source (before it is shared between processes); None =
    # all. The trainer sets it to the release's epoch (EasyR1's DataLoader, drop_last=True): floor(records /
    # global batch) full global batches, so the few records left over are dropped in every epoch, not carried
    # into the next one.
    epoch_size: int | None = None
    drop_remainder: bool = True
    prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    prompt_patch_buckets: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    min_pixels: int = processor.MIN_PIXELS
    max_pixels: int = processor.MAX_PIXELS
    pixelation_ratio: float = 0.1
    image_path: str = "release"  # processor.IMAGE_PATHS: the release's bounds resize -> RGB -> pixelate, or single_resize
    num_workers: int = 0  # grain worker processes (0 = featurize in this process)
    worker_buffer_size: int = 2
    read_threads: int = 2  # threads per process running the per-record map
    shard_index: int | None = None  # None -> jax.process_index()
    shard_count: int | None = None  # None -> jax.process_count()

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"PipelineConfig.batch_size must be >= 1, got {self.batch_size}")
        for name in ("prompt_buckets", "prompt_patch_buckets"):
            buckets = getattr(self, name)
            if not buckets or any(int(b) < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
                raise ValueError(f"PipelineConfig.{name} must be strictly increasing positive ints, got {buckets}")
        processor.check_pixelation_ratio(self.pixelation_ratio, "PipelineConfig.pixelation_ratio")
        if self.image_path not in processor.IMAGE_PATHS:
            raise ValueError(f"PipelineConfig.image_path must be one of {processor.IMAGE_PATHS}, got {self.image_path!r}")
        if any(int(b) % 4 for b in self.prompt_patch_buckets):
            raise ValueError(f"PipelineConfig.prompt_patch_buckets must be multiples of 4 (merge^2), "
                             f"got {self.prompt_patch_buckets}")
        if not 1 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"PipelineConfig needs 1 <= min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.read_threads < 1:
            raise ValueError(f"PipelineConfig.read_threads must be >= 1, got {self.read_threads}")
        if self.num_workers < 0:
            raise ValueError(f"PipelineConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ValueError(f"PipelineConfig.epoch_size must be >= 1 or None, got {self.epoch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"PipelineConfig.num_epochs must be >= 1 or None, got {self.num_epochs}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("PipelineConfig.shard_index and shard_count must be given together")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"PipelineConfig.shard_index={self.shard_index} outside [0, {self.shard_count})")


def pick_bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; past the largest, the next power of two >= n."""
    for b in buckets:
        if n <= b:
            return int(b)
    return 1 << max(0, int(n - 1).bit_length())


class Featurize:
    """Per-record map: raw record -> model inputs of both views, or a skip marker.

    Picklable (runs in grain worker processes). A given tokenizer travels with the pickle (~15 MB,
    faster to unpickle than to reload from tokenizer.json); otherwise each process loads it lazily.
    Returns {"skip": reason, "id": id, "detail": str} for a bad record instead of raising.
    """

    def __init__(self, config: PipelineConfig, tokenizer_path: str | None = None, tokenizer=None, image_root=None):
        self.config = config
        self.tokenizer_path = tokenizer_path
        self.image_root = image_root
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with _TOKENIZER_LOCK:
                if self._tokenizer is None:
                    from vaopd_jax.data.tokenizer import load_tokenizer

                    self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __call__(self, record: dict) -> dict:
        if not isinstance(record, dict):
            return {"skip": "missing_field", "id": "<no id>", "detail": f"a record must be a dict, got "
                    f"{type(record).__name__}"}
        record_id = str(record.get("id", "<no id>"))

        def skip(reason: str, detail: str = "") -> dict:
            return {"skip": reason, "id": record_id, "detail": detail}

        if record.get(UNREADABLE):
            return skip("unreadable_row", str(record[UNREADABLE]))
        question, answer, entries = record.get("question"), record.get("answer"), record.get("images")
        if question is None or answer is None or entries is None or "id" not in record:
            missing = [k for k in ("id", "question", "answer", "images") if record.get(k) is None]
            return skip("missing_field", f"missing {missing}")
        if not isinstance(question, str) or not question.replace(processor.IMAGE_PLACEHOLDER, "").strip():
            return skip("empty_question")
        if not str(answer).strip():
            return skip("empty_answer")
        if isinstance(entries, (str, bytes, dict)) or not hasattr(entries, "__len__"):
            entries = [entries]  # one image given bare instead of a list of one
        if len(entries) == 0:
            return skip("no_image")
        images, notes = [], []
        for entry in entries:
            try:
                image = load_image(entry, self.image_root)
            except FileNotFoundError as err:
                return skip("missing_image_file", str(err))
            except ImageTooLargeError as err:
                return skip("image_too_large", str(err))
            except Exception as err:  # PIL raises several types for corrupt data
                return skip("undecodable_image", f"{type(err).__name__}: {err}")
            images.append(image)
            notes.extend(processor.image_notes(image))
        cfg = self.config
        try:
            rows, grids, rows_pix = [], [], []
            for image in images:
                r, rp, g = processor.preprocess_views(image, cfg.pixelation_ratio, cfg.min_pixels, cfg.max_pixels,
                                                      cfg.image_path)
                rows.append(r)
                rows_pix.append(rp)
                grids.append(g)
        except Exception as err:  # e.g. aspect ratio > 200
            return skip("bad_image", f"{type(err).__name__}: {err}")
        try:
            tokenizer = self.tokenizer
            with _TOKENIZER_LOCK:  # HF fast tokenizers may raise "Already borrowed" under concurrent calls
                input_ids, token_types = processor.build_prompt(tokenizer, question, grids)
        except ValueError as err:
            return skip("placeholder_mismatch", str(err))
        except Exception as err:  # noqa: BLE001 - e.g. a tokenizer refusing unpaired surrogates
            return skip("bad_question", f"the question cannot be tokenized: {type(err).__name__}: {err}")
        if len(input_ids) > cfg.prompt_buckets[-1]:
            return skip("prompt_too_long", f"{len(input_ids)} tokens > limit {cfg.prompt_buckets[-1]}")
        return {
            "id": record_id,
            "answer": str(answer),
            "kind": str(record.get("kind", "")),
            "reply": str(record.get("reply", "")),
            "input_ids": input_ids,
            "mm_token_type_ids": token_types,
            "pixel_values": np.concatenate(rows, axis=0),
            "pixel_values_pixelated": np.concatenate(rows_pix, axis=0),
            "image_grid_thw": np.stack(grids).astype(np.int32),
            "notes": tuple(notes),
        }


def collate(examples: list[dict], config: PipelineConfig, pad_id: int, model_config) -> PromptBatch:
    """Pads B featurized examples to bucketed static shapes: a `PromptBatch` of `config.batch_size` rows (the
    rows after the examples are filler, `example_mask` False)."""
    longest = max(len(e["input_ids"]) for e in examples)
    patches = max(int(np.prod(e["image_grid_thw"], axis=1).sum()) for e in examples)
    prompt_len = pick_bucket(longest, config.prompt_buckets)
    patches_per_prompt = pick_bucket(patches, config.prompt_patch_buckets)
    if patches_per_prompt > config.prompt_patch_buckets[-1]:
        logger.warning("a prompt needs %d patch rows, above the largest bucket %d: padded to %d (one extra "
                       "compilation)", patches, config.prompt_patch_buckets[-1], patches_per_prompt)
    return batch_lib.from_examples(examples, model_config, pad_id=pad_id, batch_size=config.batch_size,
                                   prompt_len=prompt_len, patches_per_prompt=patches_per_prompt)


@dataclasses.dataclass
class SkipCounters:
    """Bad-record counters the trainer logs: skips per reason (SKIP_REASONS), kept-but-converted images per kind
    (CONVERSIONS), prompts and batches delivered."""

    counts: dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    prompts: int = 0
    batches: int = 0
    converted: dict[str, int] = dataclasses.field(default_factory=lambda: {c: 0 for c in CONVERSIONS})

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """Flat {name: int} for metric writers, e.g. {'data/skipped/undecodable_image': 1, ...}."""
        out = {f"data/skipped/{k}": v for k, v in self.counts.items()}
        out.update({f"data/converted/{k}": v for k, v in self.converted.items()})
        out.update({"data/skipped": self.skipped, "data/prompts": self.prompts, "data/batches": self.batches})
        return out

    def summary(self) -> str:
        """One line for the end of a run: every non-zero count by kind, e.g. 'skipped 3 (undecodable_image 2,
        ...); converted 1 (cmyk 1); 64 prompts in 32 batches'."""
        def listed(counts):
            return ", ".join(f"{k} {v}" for k, v in counts.items() if v)

        skipped, converted = sum(self.counts.values()), sum(self.converted.values())
        return (f"data: skipped {skipped} record(s)" + (f" ({listed(self.counts)})" if skipped else "")
                + f"; converted {converted} image(s)" + (f" ({listed(self.converted)})" if converted else "")
                + f"; {self.prompts} prompts in {self.batches} batches")


class PromptBatchIterator(grain.DatasetIterator):
    """Pulls featurized records, skips + counts + logs bad ones, and yields padded batches.

    The state is the parent grain iterator's state plus the counters, the count of records pulled
    and where this process's slice of the global record stream starts (JSON-serializable), so a
    restored iterator yields exactly the batches the original would have yielded next.
    ``set_state_from_processes`` re-derives the position when the process count changed.
    """

    def __init__(self, parent: grain.DatasetIterator, config: PipelineConfig, pad_id: int, model_config, *,
                 reopen=None, start: int = 0):
        super().__init__(parent)
        self.config = config
        self.pad_id = int(pad_id)
        self.model_config = model_config
        self.counters = SkipCounters()
        self._logged_ids: set[str] = set()
        self._reopen_fn = reopen  # start -> a parent reading this process's records from global record `start`
        self._start = int(start)
        self._records = 0  # records (kept or skipped) pulled from the parent since `start`

    def __next__(self) -> PromptBatch:
        examples = []
        while len(examples) < self.config.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            self._records += 1
            if "skip" in element:
                self.counters.counts[element["skip"]] = self.counters.counts.get(element["skip"], 0) + 1
                if element["id"] not in self._logged_ids:  # once per id, also across epochs
                    self._logged_ids.add(element["id"])
                    logger.warning("skipping record %s: %s %s", element["id"], element["skip"], element["detail"])
                continue
            for note in element.pop("notes", ()):
                self.counters.converted[note] = self.counters.converted.get(note, 0) + 1
            examples.append(element)
        if not examples or (len(examples) < self.config.batch_size and self.config.drop_remainder):
            raise StopIteration
        self.counters.prompts += len(examples)
        self.counters.batches += 1
        return collate(examples, self.config, self.pad_id, self.model_config)

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "counts": dict(self.counters.counts),
            "prompts": self.counters.prompts,
            "batches": self.counters.batches,
            "converted": dict(self.counters.converted),
            "start": self._start,
            "records": self._records,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        start = int(state.get("start", 0))
        if start != self._start:  # written after a change of process count: the slice starts elsewhere
            self._reopen(start)
        self._parent.set_state(state["parent"])
        self._records = int(state.get("records", 0))
        self.counters = SkipCounters({**{r: 0 for r in SKIP_REASONS}, **state["counts"]}, int(state["prompts"]),
                                     int(state["batches"]),
                                     {**{c: 0 for c in CONVERSIONS}, **state.get("converted", {})})

    def set_state_from_processes(self, states: list[dict[str, Any]]) -> str:
        """Positions this process from the states of ALL processes of a run with another process count.

        Process p of n read the global records start+p, start+p+n, ... and pulled ``records_p`` of
        them, so every record before ``start + n * min_p(records_p)`` has been read by its process.
        This process resumes its slice of the stream there. Exact (no record read twice or missed)
        when every process pulled the same count, i.e. when no process skipped more bad records than
        another; otherwise the records some processes read past that point are read again. Returns
        a note saying which. The skip counters of all processes are summed on process 0.
        """
        starts = {int(s.get("start", 0)) for s in states}
        if len(starts) != 1 or any("records" not in s for s in states):
            raise ValueError("the data positions were written by a pipeline without global record counts or with "
                             f"different starts {sorted(starts)}: cannot re-derive this process's position")
        pulled = [int(s["records"]) for s in states]
        start = starts.pop() + len(states) * min(pulled)
        self._reopen(start)
        counts = SkipCounters()
        if _shard(self.config)[0] == 0:
            for s in states:
                for reason, n in s["counts"].items():
                    counts.counts[reason] = counts.counts.get(reason, 0) + int(n)
                for kind, n in s.get("converted", {}).items():
                    counts.converted[kind] = counts.converted.get(kind, 0) + int(n)
                counts.prompts += int(s["prompts"])
            counts.batches = max(int(s["batches"]) for s in states)
        self.counters = counts
        again = sum(n - min(pulled) for n in pulled)
        index, count = _shard(self.config)
        note = (f"data position re-derived for process {index} of {count} from the {len(states)} processes that wrote "
                f"the checkpoint: the global record stream resumes at record {start}")
        return note + (" (exact)" if again == 0 else
                       f"; {again} records that some of them had read past it (they skipped bad records) are read again")

    def _reopen(self, start: int) -> None:
        if self._reopen_fn is None:
            raise ValueError("this PromptBatchIterator was built without `reopen`: it cannot move to global record "
                             f"{start}")
        old = self._parent
        super().__init__(self._reopen_fn(start))
        close = getattr(old, "close", None)
        if close is not None:
            close()
        self._start, self._records = int(start), 0

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()

    def __str__(self) -> str:
        return f"PromptBatchIterator(batch_size={self.config.batch_size})"


def _shard(config: PipelineConfig) -> tuple[int, int]:
    if config.shard_count is not None:
        return int(config.shard_index), int(config.shard_count)
    import jax

    return jax.process_index(), jax.process_count()


class _EpochPrefixes:
    """Random-access view of a repeated dataset (``records_per_epoch`` per epoch) that keeps the first
    ``epoch_size`` records of each epoch: global index g reads record ``g % epoch_size`` of epoch
    ``g // epoch_size``. An index map, not a filter, so the stream can be sliced between processes."""

    def __init__(self, repeated, records_per_epoch: int, epoch_size: int, num_epochs: int | None):
        self.repeated, self.records_per_epoch, self.epoch_size = repeated, records_per_epoch, epoch_size
        self.length = sys.maxsize if num_epochs is None else num_epochs * epoch_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        epoch, offset = divmod(int(index), self.epoch_size)
        return self.repeated[epoch * self.records_per_epoch + offset]


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    """grain workers ignore SIGINT/SIGTERM: a Ctrl-C or a job-wide SIGTERM reaches every process of the
    group, and the trainer stops cleanly (vaopd_jax/runtime/preemption.py) only while its workers still serve the
    data position it saves. They end with the main process."""
    del worker_index, worker_count
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_dataset(source, config: PipelineConfig, tokenizer_path: str | None = None, tokenizer=None,
                 image_root=None, *, start: int = 0) -> grain.IterDataset:
    """grain IterDataset of featurized records (or skip markers) for this process's shard.

    The global record stream (the records shuffled per epoch with ``config.seed``, the first
    ``config.epoch_size`` of each epoch, repeated) is the same on every process; process i of n
    reads its records ``start + i``, ``start + i + n``, ... (disjoint slices that cover it).
    ``start``: global records consumed before a change of process count
    (``PromptBatchIterator.set_state_from_processes``).
    """
    config.validate()
    if len(source) == 0:
        raise ValueError(f"data source {source!r} is empty")
    shard_index, shard_count = _shard(config)
    ds = grain.MapDataset.source(source)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)  # a new permutation per epoch (grain seeds epoch e with seed+e)
    records_per_epoch = len(ds)
    ds = ds.repeat(config.num_epochs)
    if config.epoch_size is not None:
        if config.epoch_size > records_per_epoch:
            raise ValueError(f"PipelineConfig.epoch_size={config.epoch_size} exceeds the {records_per_epoch} records "
                             f"of {source!r}")
        ds = grain.MapDataset.source(_EpochPrefixes(ds, records_per_epoch, config.epoch_size, config.num_epochs))
    if shard_count > 1 or start:
        # Sharding the stream (not the source) keeps the global batches' records independent of the process
        # count: the n processes' b-record batches together hold the global records [g*n*b, (g+1)*n*b).
        ds = ds[int(start) + shard_index::shard_count]
    ds = ds.map(Featurize(config, tokenizer_path, tokenizer, image_root))
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=4 * config.batch_size))
    if config.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads absl flags in workers; outside absl.app nothing parsed them
            flags.FLAGS.mark_as_parsed()
        ids = ids.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size),
            worker_init_fn=_ignore_stop_signals,
        )
    return ids


def make_iterator(source, config: PipelineConfig, tokenizer_path: str | None = None, tokenizer=None,
                  image_root=None, *, model_config) -> PromptBatchIterator:
    """Batches iterator over `source` (any random-access source of raw records, see sources.py).

    Args:
      source: Geometry3KSource / ViRL39KSource / SyntheticSource / any __len__+__getitem__ source.
      config: PipelineConfig.
      tokenizer_path: checkpoint dir for the tokenizer, None = offline Qwen3-VL tokenizer.
      tokenizer: an already loaded tokenizer (used in this process; workers reload from path).
      model_config: the `qwen3_vl.Qwen3VLConfig` of the models that read the batches (token ids, merge size and
        vision position grid of the position ids and vision inputs).
    Returns:
      PromptBatchIterator: next() -> `PromptBatch`; `.counters` holds the bad-record counts.
    """
    dataset = make_dataset(source, config, tokenizer_path, tokenizer, image_root)

    def reopen(start: int) -> grain.DatasetIterator:
        return iter(make_dataset(source, config, tokenizer_path, tokenizer, image_root, start=start))

    if tokenizer is None:
        from vaopd_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
    return PromptBatchIterator(iter(dataset), config, pad_id=tokenizer.pad_token_id, model_config=model_config,
                               reopen=reopen)
