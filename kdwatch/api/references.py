"""The PSI baseline of a model: ``PUT`` (JSONL of contract-v1 predictions) and ``GET``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from kdwatch.analyzer.drift import Reference
from kdwatch.api.context import Context, Read, Write
from kdwatch.collector.offline import build_references
from kdwatch.errors import ContractError

router = APIRouter()


@router.put("/v1/models/{model}/reference")
async def put_reference(model: str, request: Request, context: Context, _: Write) -> dict[str, Any]:
    try:
        built = build_references((await request.body()).splitlines())
    except ContractError as exc:
        raise HTTPException(422, exc.message) from None
    if model not in built:
        raise HTTPException(422, f"no predictions of model {model!r} in the body (JSONL of contract-v1 predictions)")
    reference, count = built[model]
    context.store.put_reference(model, reference)
    return {"model": model, "predictions": count, **_describe(reference)}


@router.get("/v1/models/{model}/reference")
def get_reference(model: str, context: Context, _: Read) -> dict[str, Any]:
    reference = context.store.references().get(model)
    if reference is None:
        raise HTTPException(404, f"no reference for model {model!r}")
    return {"model": model, **_describe(reference)}


def _describe(reference: Reference) -> dict[str, Any]:
    return {"fingerprint": reference.fingerprint, "features": {
        name: {"kind": "numeric" if fb.edges is not None else "categorical", "bins": fb.n_bins,
               "edges": fb.edges, "categories": fb.categories, "reference_n": sum(fb.reference_counts)}
        for name, fb in reference.features.items()}}
