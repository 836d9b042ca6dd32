"""The data of a training run: each split's record source and its batch iterator, from the training config.

    source = data_source(config, "train")              # 'train' | 'val' | 'teacher_sft' | 'student_sft'
    batches = pipeline_for(config, tokenizer, model_config, split="train", batch_size=16)   # PromptBatches
    total = train_steps(config)                          # optimizer updates of the run

`config` is the run's typed `config.Config`.

Training splits are shuffled, repeated and sharded by process, in epochs of `epoch_steps` full batches (the
release's EasyR1 DataLoader with drop_last=True: Geometry3K's 2,101 prompts give 131 batches of 16 per epoch,
the 5 left over are dropped in every epoch); validation is read whole by every process, once, in order. The synthetic task's splits are disjoint record sets with fixed seeds (`SYNTHETIC_SEEDS`), so
every run validates on the same problems.
"""

from __future__ import annotations

import math

import jax

from vaopd_jax.data import pipeline, sources, synthetic

# Disjoint synthetic record sets, fixed (not config.seed) so that every run validates on the same problems.
SYNTHETIC_SEEDS = {"teacher_sft": 1, "train": 2, "val": 3, "student_sft": 4}


class _Subset:
    """The first ``n`` records of a random-access source (picklable for grain workers)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.source[int(index)]

    def __repr__(self) -> str:
        return f"_Subset({self.source!r}, n={self.n})"


def data_source(config, split: str):
    """The raw-record source of a split: 'train' / 'val' / 'teacher_sft' / 'student_sft' (demo warm-ups).

    Synthetic splits: `synthetic.source_from_config` (the share of fine-detail questions: data.synthetic_fine_fraction
    for train, <role>.sft.fine_fraction for the warm-ups, half for validation)."""
    d = config.data
    name = d.val_source if split == "val" else d.source
    if name == "synthetic":  # sizes, question mix and reply style from the config (synthetic.source_from_config)
        return synthetic.source_from_config(config, split, seed=SYNTHETIC_SEEDS[split])
    if split == "val":
        source = (sources.geometry3k_validation_source(d.val_path) if name == "geometry3k"
                  else sources.ViRL39KSource(d.val_path))
        return _Subset(source, config.eval.num_problems)
    return sources.Geometry3KSource(d.train_path, split="train") if name == "geometry3k" else \
        sources.ViRL39KSource(d.train_path)


def epoch_steps(num_records: int, batch_size: int) -> int:
    """Full batches in one epoch, floor(num_records / batch_size) (EasyR1: DataLoader(drop_last=True)).

    Raises:
      ValueError: fewer records than one batch (no step at all), as the release does.
    """
    if num_records < batch_size:
        raise ValueError(f"the training set has {num_records} records, fewer than one batch of {batch_size}")
    return num_records // batch_size


def train_steps(config) -> int:
    """Optimizer updates of a run: config.train.num_steps, or (-1) ceil(data.num_epochs * epoch_steps), as the
    release's trainer counts them (len(train_dataloader) * total_epochs: 131 x 5 = 655 for Geometry3K)."""
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    per_epoch = epoch_steps(len(data_source(config, "train")), config.data.prompts_per_step)
    return math.ceil(config.data.num_epochs * per_epoch)


def pipeline_for(config, tokenizer, model_config, *, split: str, batch_size: int):
    """A grain iterator of `PromptBatch`es of a split (``batch_size`` global prompts; a training split gives
    each process ``batch_size / processes`` of them)."""
    d = config.data
    train = split != "val"
    if train and batch_size % jax.process_count():
        raise ValueError(
            f"{split} batch size {batch_size} must be divisible by the number of processes {jax.process_count()}")
    source = data_source(config, split)
    local_batch = batch_size // jax.process_count() if train else batch_size
    # Every epoch of the global record stream holds the epoch's full global batches; each process reads its share.
    epoch_size = epoch_steps(len(source), batch_size) * batch_size if train else None
    pcfg = pipeline.PipelineConfig(
        batch_size=local_batch, seed=config.seed, shuffle=train and d.shuffle, num_epochs=None if train else 1,
        epoch_size=epoch_size, drop_remainder=train, prompt_buckets=tuple(d.prompt_buckets),
        prompt_patch_buckets=tuple(d.prompt_patch_buckets), min_pixels=d.min_pixels, max_pixels=d.max_pixels,
        pixelation_ratio=config.va.pixelation_ratio, image_path=d.image_path,
        num_workers=d.num_workers if train else 0, shard_index=None if train else 0,
        shard_count=None if train else 1)
    return pipeline.make_iterator(source, pcfg, tokenizer=tokenizer, model_config=model_config)
