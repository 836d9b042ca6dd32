"""Training metrics: tensorboardX scalars, a JSONL history, console progress, throughput and MFU.

Only process 0 writes (``MetricsLogger(..., is_primary=jax.process_index() == 0)``);
the other processes get a logger whose methods do nothing, so the loop calls
it unconditionally.

Files under ``<workdir>``:
  ``tb/``            tensorboard event files (``train/*``, ``time/*``, ``perf/*``, ``val/*``)
  ``metrics.jsonl``  one JSON object per logged step: {"step": n, "kind": "train"|"val", ...}

A resumed run passes ``resume_step`` (the restored checkpoint step): tensorboard
discards events after it (``purge_step``) and the JSONL drops its lines after
it, so the logs read as if the run had never been interrupted.

Logs never stop training: a sink (tensorboard, metrics.jsonl) that cannot be opened or
written (a read-only or full disk, a file where its directory should be) is turned off
with one warning naming it and the error, and the other sinks and the console go on.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device, matched by prefix of jax's ``device_kind``.
PEAK_TFLOPS = (
    ("TPU v6", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v4", 275.0), ("TPU v3", 123.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H100", 989.0), ("NVIDIA GH200", 989.0), ("NVIDIA A100", 312.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0),
)


# HBM bandwidth per device, GB/s (vendor datasheets), matched by prefix of ``device_kind``: first match wins,
# so the more specific names come first.
PEAK_HBM_GBPS = (
    ("TPU v6", 1640.0), ("TPU v5 lite", 819.0), ("TPU v5e", 819.0), ("TPU v5p", 2765.0), ("TPU v5", 2765.0),
    ("TPU v4", 1200.0), ("TPU v3", 900.0),
    ("NVIDIA H200", 4800.0), ("NVIDIA GH200", 4000.0), ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H100 NVL", 3900.0),
    ("NVIDIA H100", 3350.0), ("NVIDIA A100-SXM4-80GB", 2039.0), ("NVIDIA A100 80GB PCIe", 1935.0),
    ("NVIDIA A100", 1555.0), ("NVIDIA B200", 8000.0), ("NVIDIA L4", 300.0), ("NVIDIA A10", 600.0),
)


def _device_figure(table, device_kind: str, override: float) -> float | None:
    """``override`` when > 0, else the first table entry whose prefix starts ``device_kind``; None when unknown."""
    if override > 0:
        return float(override)
    return next((value for prefix, value in table if device_kind.startswith(prefix)), None)


def peak_hbm_gbps(device_kind: str, override: float = 0.0) -> float | None:
    """HBM bandwidth of one device in GB/s; ``override`` > 0 wins; None when unknown (e.g. CPU)."""
    return _device_figure(PEAK_HBM_GBPS, device_kind, override)


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """Peak dense bf16 TFLOP/s of one device; ``override`` > 0 wins; None when unknown (e.g. CPU)."""
    return _device_figure(PEAK_TFLOPS, device_kind, override)


def rollout_flops(student_params: int, prompt_tokens: int, generated_tokens: int) -> float:
    """Forward FLOPs of sampling: 2·N per token, prompts prefilled once (attention ignored)."""
    return 2.0 * student_params * (prompt_tokens + generated_tokens)


def update_flops(student_params: int, teacher_params: int, sequence_tokens: int, teacher_views: int) -> float:
    """FLOPs of one fused step over ``sequence_tokens`` (prompt + response tokens of all rollouts).

    Student forward + backward 6·N per token; the frozen teacher 2·N per token
    and view (2 views for VA methods: original and pixelated, 1 for OPD).
    """
    return 6.0 * student_params * sequence_tokens + 2.0 * teacher_params * sequence_tokens * teacher_views


def mfu(flops: float, seconds: float, num_devices: int, peak_tflops_per_device: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None without a known peak."""
    if not peak_tflops_per_device or seconds <= 0:
        return None
    return flops / (seconds * num_devices * peak_tflops_per_device * 1e12)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class MetricsLogger:
    """Writes step metrics to tensorboard, ``metrics.jsonl`` and the console.

    Args:
      workdir: run directory.
      total_steps: for progress and ETA.
      is_primary: only the primary process writes anything.
      resume_step: the restored step of a resumed run (logs after it are discarded).
      console_every: print one progress line every this many steps.
    """

    def __init__(self, workdir: str, *, total_steps: int, is_primary: bool = True, resume_step: int = 0,
                 console_every: int = 1):
        self.total_steps = total_steps
        self.is_primary = is_primary
        self.console_every = console_every
        self._step_times: collections.deque = collections.deque(maxlen=20)
        self._writer = None
        self._jsonl = None
        self.disabled: dict[str, str] = {}  # sink -> why it was turned off
        if not is_primary:
            return
        from tensorboardX import SummaryWriter

        self.tb_dir = os.path.join(workdir, "tb")
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError:
            pass  # each sink below reports its own failure
        try:
            os.makedirs(self.tb_dir, exist_ok=True)
            # A unique suffix: a restart within the same second must not overwrite
            # the previous event file (tensorboardX names files by second + host).
            self._writer = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 if resume_step else None,
                                         filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        except OSError as err:
            self._disable("tensorboard", self.tb_dir, err)
        try:
            _truncate_jsonl(self.jsonl_path, resume_step)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        except OSError as err:
            self._disable("metrics.jsonl", self.jsonl_path, err)

    def _disable(self, sink: str, path: str, err: Exception) -> None:
        self.disabled[sink] = f"{type(err).__name__}: {err}"
        log.warning("cannot write the %s log %s (%s: %s): it is turned off for the rest of the run; training "
                    "goes on and the other logs still get every step", sink, path, type(err).__name__, err)

    def log_train(self, step: int, metrics: Mapping[str, float], *, rollout_s: float, update_s: float,
                  tokens: int, flops: float | None = None, num_devices: int = 1,
                  peak_tflops_per_device: float | None = None, extra: Mapping[str, float] | None = None) -> dict:
        """Logs one training step; returns the scalars written (for tests and the caller).

        Args:
          metrics: the train step's metrics (host floats), all written as ``train/<name>``.
          rollout_s / update_s: wall time of sampling and of the fused update.
          tokens: tokens processed this step (prompt + response, all rollouts).
          flops: model FLOPs of the step (``rollout_flops + update_flops``) for MFU.
          extra: more scalars written under their own names (e.g. ``data/skipped``).
        """
        step_s = rollout_s + update_s
        self._step_times.append(step_s)
        scalars = {f"train/{k}": float(v) for k, v in metrics.items()}
        scalars.update({
            "time/rollout_s": rollout_s, "time/update_s": update_s, "time/step_s": step_s,
            "time/rollout_share": rollout_s / step_s if step_s > 0 else 0.0,
            "perf/tokens_per_s": tokens / step_s if step_s > 0 else 0.0,
        })
        scalars.update({k: float(v) for k, v in (extra or {}).items()})
        if flops is not None:
            scalars["perf/tflops_per_s_per_device"] = flops / max(step_s, 1e-9) / num_devices / 1e12
            util = mfu(flops, step_s, num_devices, peak_tflops_per_device)
            if util is not None:
                scalars["perf/mfu"] = util
        if not self.is_primary:
            return scalars
        self._write(step, "train", scalars)
        if step % self.console_every == 0 or step == self.total_steps:
            mean_s = sum(self._step_times) / len(self._step_times)
            eta = format_duration(mean_s * (self.total_steps - step))
            loss = metrics.get("loss", float("nan"))
            extra = f" | mfu {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else ""
            print(f"step {step}/{self.total_steps} | loss {loss:.4f} | "
                  f"{scalars['perf/tokens_per_s']:,.0f} tok/s | rollout {rollout_s:.2f}s update {update_s:.2f}s"
                  f"{extra} | ETA {eta}", flush=True)
        return scalars

    def log_val(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs validation metrics as ``val/<name>``."""
        if not self.is_primary:
            return
        scalars = {f"val/{k}": float(v) for k, v in metrics.items()}
        self._write(step, "val", scalars)
        print(f"validation @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

    def _write(self, step: int, kind: str, scalars: Mapping[str, float]) -> None:
        if self._writer is not None:
            try:
                for name, value in scalars.items():
                    self._writer.add_scalar(name, value, step)
            except OSError as err:
                self._writer = None
                self._disable("tensorboard", self.tb_dir, err)
        if self._jsonl is not None:
            record = {"step": step, "kind": kind, "time": time.time()}
            record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
            try:
                self._jsonl.write(json.dumps(record) + "\n")
                self._jsonl.flush()
            except OSError as err:
                self._jsonl = None
                self._disable("metrics.jsonl", self.jsonl_path, err)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        for sink, closer in (("tensorboard", self._writer), ("metrics.jsonl", self._jsonl)):
            if closer is None:
                continue
            try:
                closer.close()
            except OSError as err:  # the last buffered events could not be written
                self._disable(sink, self.tb_dir if sink == "tensorboard" else self.jsonl_path, err)
        self._writer = self._jsonl = None


def _truncate_jsonl(path: str, resume_step: int) -> None:
    """Drops records after ``resume_step`` (0: a fresh run starts an empty file)."""
    if not os.path.exists(path):
        return
    kept = []
    if resume_step:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by a kill mid-write
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_jsonl(path: str, kind: str | None = None) -> list[dict]:
    """Records of ``metrics.jsonl`` (optionally only ``kind``), in file order."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if kind is None or record["kind"] == kind:
                out.append(record)
    return out


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (same as tensorboardX.record_writer.masked_crc32c)."""
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_files(path: str | os.PathLike) -> list[str]:
    """The event files of a log directory (recursively, oldest first) or the one file given."""
    import glob

    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*tfevents*"), recursive=True), key=os.path.getmtime)
        if not files:
            raise FileNotFoundError(f"no TensorBoard event file (*tfevents*) under {path}")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"event file or log directory not found: {path}")
    return [path]


def iter_events(path: str | os.PathLike) -> Iterator[Any]:
    """The ``Event`` protos of an event file, or of every one under a directory (oldest file first).

    Reads the TFRecord framing (u64 length, masked CRC, data, masked CRC) directly, so the ``tensorboard``
    package is not needed. A truncated final record (a writer still open, or a run killed mid-write) ends the
    file quietly; a CRC mismatch raises ValueError naming the file and byte offset.
    """
    import struct

    from tensorboardX.proto import event_pb2

    for file_name in _event_files(path):
        with open(file_name, "rb") as handle:
            data = handle.read()
        offset = 0
        while offset + 12 <= len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
            if header_crc != _masked_crc32c(header):
                raise ValueError(f"{file_name}: corrupt record header at byte {offset}")
            end = offset + 12 + length + 4
            if end > len(data):
                break  # truncated tail: the writer has not flushed the rest yet
            payload = data[offset + 12:offset + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[end - 4:end])
            if payload_crc != _masked_crc32c(payload):
                raise ValueError(f"{file_name}: corrupt record payload at byte {offset}")
            yield event_pb2.Event.FromString(payload)
            offset = end


def read_tensorboard_scalars(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} (sorted by step) from an event file or log directory, as TensorBoard shows
    them: a ``purge_step`` restart (a SessionLog START at step s) hides earlier events with step >= s. The form
    ``notebook.diagnostics.plot_curves`` takes. Needs only tensorboardX's protobufs, not tensorboard."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for event in iter_events(path):
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            for tag in scalars:
                scalars[tag] = [(s, v) for s, v in scalars[tag] if s < event.step]
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars[value.tag].append((int(event.step), float(value.simple_value)))
    return {tag: sorted(points, key=lambda point: point[0]) for tag, points in scalars.items()}


def summary_table(jsonl_path: str) -> str:
    """Before/after table from the first and last validation records of metrics.jsonl."""
    vals = read_jsonl(jsonl_path, kind="val")
    if not vals:
        return "(no validation ran: set --config.eval.every > 0)"
    first, last = vals[0], vals[-1]
    rows = [("accuracy, fine-detail questions", "val/accuracy_fine"),
            ("accuracy, coarse questions", "val/accuracy_coarse"), ("accuracy, all", "val/accuracy"),
            ("mean student VA", "val/student_va_mean")]
    lines = [f"{'':34s}{'before (step %d)' % first['step']:>20s}{'after (step %d)' % last['step']:>20s}"]
    for name, key in rows:
        if key in first:
            lines.append(f"{name:34s}{first[key]:>20.3f}{last.get(key, float('nan')):>20.3f}")
    return "\n".join(lines)


def run_report(workdir: str, best_info: dict | None) -> str:
    """The end of a run: the before/after table and where its logs and exported students are."""
    join = os.path.join
    lines = ["", summary_table(join(workdir, "metrics.jsonl")), "",
             f"tensorboard logs: tensorboard --logdir {join(workdir, 'tb')}",
             f"metrics:          {join(workdir, 'metrics.jsonl')}",
             f"student (HF):     {join(workdir, 'export', 'final')}"]
    if best_info:
        lines.append(f"best student:     {join(workdir, 'export', 'best')} (step {best_info['step']}, validation "
                     f"accuracy {best_info['accuracy']:.4f})")
    return "\n".join(lines)
