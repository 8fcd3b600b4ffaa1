"""Shard downloads for rank agents that cannot read the daemon's artifact files (other hosts)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from api.deps import Core, Reader
from api.schemas import error_responses
from orchestrator.errors import NotFound

router = APIRouter(tags=["artifacts"])


class ShardResponse(FileResponse):
    # Shards run to gigabytes; Starlette's 64 KiB reads cost a thread hop each.
    chunk_size = 1 << 20


@router.get(
    "/artifacts/{version}/{rank}",
    response_class=ShardResponse,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        },
        **error_responses(401, 403, 404, 422, 503),
    },
)
async def get_shard(version: int, rank: int, core: Core, _: Reader) -> ShardResponse:
    """Stream rank `rank`'s safetensors shard of `version`. Needs the trainer or admin token.

    Header `X-Refitd-Sha256` is the file's sha256 as written; rank agents stream the file into
    place and check the version's digest on the device before staging.
    """
    store = core.artifacts
    entry = await run_in_threadpool(store.shard_info, version, rank)
    path = store.path(version, rank)
    if not path.is_file():
        raise NotFound(f"the shard of version {version} for rank {rank} is no longer stored")
    return ShardResponse(
        path,
        media_type="application/octet-stream",
        filename=path.name,
        headers={"X-Refitd-Sha256": entry["sha256"]},
    )
