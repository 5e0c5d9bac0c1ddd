"""SFT-Eraser (SPEC §5, §6): activation capture, trigger optimisation, generation and metrics."""
