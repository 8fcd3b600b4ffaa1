# refitd for a GPU host. The CUDA build of torch comes from the base image; refitd adds the rest.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
WORKDIR /opt/refitd
COPY pyproject.toml README.md ./
COPY api api
COPY orchestrator orchestrator
COPY kernels kernels
COPY configs configs
# --no-deps for torch: keep the image's CUDA build instead of the CPU pin used on CPU machines.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "triton>=3.2" "fastapi>=0.115" "uvicorn>=0.30" "pydantic>=2.7" \
      "pydantic-settings>=2.3" "pyyaml>=6" "redis>=5" "safetensors>=0.4" "transformers>=4.51" \
      "typer>=0.12" "httpx>=0.27" "prometheus-client>=0.20"
ENTRYPOINT ["refitd"]
