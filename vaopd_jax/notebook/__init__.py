"""Glue the notebooks use: ``utils`` (run the trainer, compare runs, score a student's answers with
the teacher's visual advantage) and ``diagnostics`` (VA views, concentration curves, tensorboard images)."""
