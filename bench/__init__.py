"""spendgate benchmarks: `make bench` (python -m bench). Never run by `make test`."""
