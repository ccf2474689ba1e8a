"""clipadapt's performance benchmarks (`python -m benchmarks --help`)."""
