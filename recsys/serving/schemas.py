"""Request and response bodies of the ranking API.

Types are strict: a JSON string, float or boolean where an integer id is expected is a 422, not
a silent cast, and unknown fields are refused so a misspelt `candidate` cannot pass unnoticed.
Ids are raw int64 keys (TAOBAO-MM ids are hashed signed int64), so both bounds are checked.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Int64 = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
Timestamp = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX, description="seconds since the epoch")]


class RankRequest(BaseModel):
    """One user and the candidate items to rank for them.

    The upper bound on the candidate count is a server setting, checked by the app.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: Int64
    candidates: list[Int64] = Field(min_length=1, description="raw item ids, no repeats")
    ts: Timestamp | None = Field(
        default=None,
        description="score as of this time: only behaviours strictly before it are used; "
        "omitted = after the whole stored history",
    )


class RankedItem(BaseModel):
    item_id: int
    score: float = Field(description="predicted click probability")


class RankResponse(BaseModel):
    """Candidates sorted by score, highest first, with the model version that scored them."""

    user_id: int
    model_version: str
    items: list[RankedItem]
    timings_ms: dict[str, float] = Field(description="history fetch, GSU, ESU and total, in ms")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: one sentence, plus per-field problems for validation errors."""

    error: str
    fields: list[dict[str, str]] = Field(default_factory=list)
