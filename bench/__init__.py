"""Benchmarks: ember against a raw PyTorch loop and the transformers Trainer (`python -m bench.compare`).

Kept free of imports: children time `import torch` and the library themselves.
"""
