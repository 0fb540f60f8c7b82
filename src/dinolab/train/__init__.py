"""Training: schedules, optimizer parameter groups, the EMA teacher update, and the training step."""
