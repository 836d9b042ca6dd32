"""What a run needs around the train step: checkpoints (Orbax), metrics and logs, phase timing, preemption,
the watchdog, the persistent compilation cache and the host allocator."""
