"""Training: the trainer, the stage loader, checkpoints, optimizer and schedules, MFU and CPU memory."""
