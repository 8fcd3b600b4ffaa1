# refitd for a GPU host. torch is pyproject.toml's pin, installed with the project: PyPI's Linux
# x86_64 wheel of it is the CUDA build (the CUDA runtime arrives as nvidia-* wheels; the host
# supplies only the driver, through the NVIDIA container toolkit). One pin in one place:
# tests/test_docker_compose.py fails if this file names another torch.
FROM python:3.11-slim
WORKDIR /opt/refitd
COPY pyproject.toml README.md ./
COPY api api
COPY orchestrator orchestrator
COPY kernels kernels
COPY configs configs
# Editable: refitd finds configs/ beside its sources (REPO_ROOT), so they stay in /opt/refitd.
RUN pip install --no-cache-dir -e .
ENTRYPOINT ["refitd"]
