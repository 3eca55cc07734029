"""Launching runs: cluster profiles, sbatch rendering, submission and status, rank wiring."""
