"""Training: the trainer, the stage loader, checkpoints, optimizer and schedules, MFU, CPU memory and the run lock."""
