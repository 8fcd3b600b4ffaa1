"""The data path's building blocks: flat per-rank buffers and their tables (flat), hand-off to
another process on the same host (ipc), safetensors sources in and artifacts out (files).
Imports torch, kernels/ and the leaf modules orchestrator.errors / orchestrator.text only.
"""
