"""Studies over many runs: sweeps, one sweep point in its own process, plots."""
