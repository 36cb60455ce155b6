"""The torch-only code, in one place: the PyTorch reference networks (reference) that the tests compare
against, and the PyTorch side of `bench --vs_torch` (bench). Importing it needs torch."""
