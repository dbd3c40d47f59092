"""Launching: the command each launcher mode runs (launch.sh), SLURM task -> rank mapping,
and the environment carried to remote nodes."""
