"""What a run leaves on disk and how it is read back: atomic writes, checkpoint files and
their damage, the run directory's lock, resuming, and run directories given on the command
line."""
