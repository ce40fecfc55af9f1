"""The device mesh and parameter shardings; multi-process start-up."""
