"""The model: TP planning, quantizing and sharding, the Hugging Face model and verification.
Imports torch, transformers and kernels/ only (plus orchestrator.errors and orchestrator.text,
which import nothing of ours), so it runs where the service's dependencies are not installed.
"""
