"""HTTP behaviour of the ranking app: validation, limits, overload, deadline, hot reload, fuzz.

Run against a stand-in scorer (see conftest.py) so each test controls exactly when scoring
finishes; the real Ranker behind the same app is covered in test_serving_ranker.py.
"""
from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from recsys.serving.app import ServeSettings, create_app
from recsys.serving.pool import Overloaded, ScoringPool
from recsys.serving.reload import AliasPoller, ModelHolder
from recsys.serving.schemas import INT64_MAX, INT64_MIN

JSON = {"content-type": "application/json"}


def client_for(scorer, **limits) -> TestClient:
    return TestClient(create_app(ModelHolder(scorer), ServeSettings(**limits)))


def test_rank_sorts_candidates_and_reports_version(make_stub):
    stub = make_stub("3")
    candidates = [5, -7, INT64_MAX, INT64_MIN, 0, 123456789012]
    with client_for(stub) as client:
        response = client.post("/rank", json={"user_id": 42, "candidates": candidates, "ts": 1_700_000_000})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "3" and body["user_id"] == 42
    expected = stub.expected(candidates)
    want_order = [candidates[i] for i in np.argsort(-expected.astype(np.float64), kind="stable")]
    assert [item["item_id"] for item in body["items"]] == want_order
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert set(body["timings_ms"]) == {"history", "gsu", "esu", "total", "request"}


MALFORMED = [
    ("wrong type: id as string", b'{"user_id": "1", "candidates": [1]}', 422, "user_id"),
    ("wrong type: id as float", b'{"user_id": 1.0, "candidates": [1]}', 422, "user_id"),
    ("wrong type: id as bool", b'{"user_id": true, "candidates": [1]}', 422, "user_id"),
    ("wrong type: candidate as string", b'{"user_id": 1, "candidates": [1, "2"]}', 422, "candidates.1"),
    ("candidates not a list", b'{"user_id": 1, "candidates": 5}', 422, "candidates"),
    ("empty candidates", b'{"user_id": 1, "candidates": []}', 422, "candidates"),
    ("too many candidates", json.dumps({"user_id": 1, "candidates": list(range(11))}).encode(), 422, "candidates"),
    ("repeated candidates", b'{"user_id": 1, "candidates": [3, 3]}', 422, "candidates"),
    ("id above int64", json.dumps({"user_id": 2**63, "candidates": [1]}).encode(), 422, "user_id"),
    ("id below int64", json.dumps({"user_id": 1, "candidates": [-(2**63) - 1]}).encode(), 422, "candidates.0"),
    ("negative ts", b'{"user_id": 1, "candidates": [1], "ts": -5}', 422, "ts"),
    ("missing user_id", b'{"candidates": [1]}', 422, "user_id"),
    ("missing candidates", b'{"user_id": 1}', 422, "candidates"),
    ("unknown field", b'{"user_id": 1, "candidates": [1], "candidate": [2]}', 422, "candidate"),
    ("bad JSON", b'{"user_id": 1, "candidates": [1', 422, "body"),
    ("empty body", b"", 422, "body"),
    ("JSON array body", b"[1, 2]", 422, "body"),
    ("not UTF-8", b'{"user_id": 1, "candidates": [1], "x": "\xff"}', 400, None),
    ("too large", json.dumps({"user_id": 1, "candidates": [1] * 400}).encode(), 413, None),
]


@pytest.mark.parametrize("name,body,status,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_4xx_naming_the_field(make_stub, name, body, status, field):
    with client_for(make_stub(), max_candidates=10, max_body_bytes=1000) as client:
        response = client.post("/rank", content=body, headers=JSON)
        assert response.status_code == status, response.text
        error = response.json()
        assert error["error"]
        if field is not None:
            assert field in [f["field"] for f in error["fields"]], error
        # The service keeps serving after every rejection.
        assert client.post("/rank", json={"user_id": 1, "candidates": [1, 2]}).status_code == 200


def test_chunked_body_over_the_limit_is_cut_off(make_stub):
    def chunks():
        yield b'{"user_id": 1, "candidates": ['
        for _ in range(200):
            yield b"1234567890, "
        yield b"1]}"

    with client_for(make_stub(), max_body_bytes=500) as client:
        response = client.post("/rank", content=chunks(), headers=JSON)
        assert response.status_code == 413
        assert "500 bytes" in response.json()["error"]
        assert client.get("/healthz").status_code == 200


def test_over_the_concurrency_bound_gets_503_while_health_checks_answer(make_stub):
    stub = make_stub(blocking=True)
    with client_for(stub, max_concurrency=2, scoring_threads=2) as client, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(client.post, "/rank", json={"user_id": u, "candidates": [1, 2]}) for u in (1, 2)]
        assert stub.entered.acquire(timeout=10) and stub.entered.acquire(timeout=10)
        over = client.post("/rank", json={"user_id": 3, "candidates": [1]})
        assert over.status_code == 503
        assert over.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        stub.release.set()
        assert [f.result(timeout=10).status_code for f in held] == [200, 200]
        assert client.post("/rank", json={"user_id": 3, "candidates": [1]}).status_code == 200
        assert 'muse_rank_errors_total{reason="overloaded"} 1.0' in client.get("/metrics").text


def test_deadline_gives_504_and_frees_the_slot_when_scoring_ends(make_stub):
    stub = make_stub(blocking=True)
    with client_for(stub, timeout_ms=50, max_concurrency=1, scoring_threads=1) as client:
        late = client.post("/rank", json={"user_id": 1, "candidates": [1]})
        assert late.status_code == 504
        assert "50 ms" in late.json()["error"]
        # The scoring thread still runs, so the single slot is still taken.
        assert client.post("/rank", json={"user_id": 1, "candidates": [1]}).status_code == 503
        stub.release.set()
        for _ in range(100):  # the slot frees when the thread finishes, a moment after release
            response = client.post("/rank", json={"user_id": 1, "candidates": [1]})
            if response.status_code == 200:
                break
        assert response.status_code == 200


def test_scorer_failure_is_a_500_and_the_service_keeps_serving(make_stub):
    stub = make_stub()

    class Failing:
        version = "1"

        def score(self, user_id, candidate_ids, ts=None):
            if user_id == 13:
                raise ValueError("boom")
            return stub.score(user_id, candidate_ids, ts)

    with client_for(Failing()) as client:
        assert client.post("/rank", json={"user_id": 13, "candidates": [1]}).status_code == 500
        assert client.post("/rank", json={"user_id": 14, "candidates": [1]}).status_code == 200


def test_metrics_count_requests_latency_and_version(make_stub):
    with client_for(make_stub("7")) as client:
        client.post("/rank", json={"user_id": 1, "candidates": [1, 2]})
        client.post("/rank", json={"user_id": "x", "candidates": [1]})
        text = client.get("/metrics").text
    assert 'muse_rank_requests_total{status="200"} 1.0' in text
    assert 'muse_rank_requests_total{status="422"} 1.0' in text
    assert "muse_rank_latency_seconds_count 1.0" in text
    assert 'muse_rank_stage_seconds_count{stage="gsu"} 1.0' in text
    assert 'muse_model_version{version="7"} 1.0' in text


def test_hot_reload_under_concurrent_requests_has_no_failures(make_stub):
    """The alias moves v1 -> v2 while 4 clients rank: every answer is a complete v1 or v2 ranking."""
    versions = {"1": make_stub("1"), "2": make_stub("2")}
    alias = {"target": "1"}
    holder = ModelHolder(versions["1"])
    poller = AliasPoller(holder, probe=lambda: alias["target"], load=lambda: versions[alias["target"]], interval_s=0.01)
    app = create_app(holder, ServeSettings(max_concurrency=8), poller=poller)
    candidates = list(range(1, 51))
    stop = threading.Event()

    def client_loop(client: TestClient) -> list[tuple[int, str, list[int]]]:
        seen = []
        while not stop.is_set() or len(seen) < 5:
            response = client.post("/rank", json={"user_id": 1, "candidates": candidates})
            body = response.json()
            seen.append((response.status_code, body.get("model_version"), [i["item_id"] for i in body.get("items", [])]))
        return seen

    with TestClient(app) as client, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, client) for _ in range(4)]
        threading.Event().wait(0.2)
        alias["target"] = "2"
        for _ in range(200):
            if holder.current.version == "2":
                break
            threading.Event().wait(0.01)
        threading.Event().wait(0.2)
        stop.set()
        results = [r for f in futures for r in f.result(timeout=30)]
        metrics_text = client.get("/metrics").text
    assert holder.current.version == "2"
    assert all(status == 200 for status, _, _ in results)
    for version in ("1", "2"):
        expected = versions[version].expected(candidates).astype(np.float64)
        order = [candidates[i] for i in np.argsort(-expected, kind="stable")]
        answers = [items for _, v, items in results if v == version]
        assert answers, f"no request was answered by version {version}"
        assert all(items == order for items in answers)
    assert 'muse_model_reloads_total{result="swapped"} 1.0' in metrics_text
    assert 'muse_model_version{version="2"} 1.0' in metrics_text


def test_failed_reload_keeps_the_old_model(make_stub):
    holder = ModelHolder(make_stub("1"))

    def broken_load():
        raise OSError("weights file truncated")

    poller = AliasPoller(holder, probe=lambda: "2", load=broken_load, interval_s=60)
    assert poller.check_once() is False
    assert holder.current.version == "1"


# --- fuzz -------------------------------------------------------------------------------------

ints = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.integers(), st.sampled_from([2**63, -(2**63) - 1, 0]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), st.text(max_size=5))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=10)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": st.one_of(ints, scalars),
        "candidates": st.one_of(st.lists(ints, max_size=12), st.lists(scalars, max_size=3), scalars),
        "ts": st.one_of(ints, scalars),
    },
)


@pytest.fixture(scope="module")
def fuzz_client(make_stub):
    with client_for(make_stub(), max_candidates=10, max_body_bytes=2000) as client:
        yield client


@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(request_like, json_values))
def test_fuzz_json_bodies_get_a_ranking_or_a_4xx(fuzz_client, body):
    response = fuzz_client.post("/rank", content=json.dumps(body).encode(), headers=JSON)
    assert response.status_code in (200, 400, 413, 422), response.text
    payload = response.json()
    if response.status_code == 200:
        assert sorted(i["item_id"] for i in payload["items"]) == sorted(body["candidates"])
    else:
        assert payload["error"]


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_fuzz_raw_bytes_never_break_the_service(fuzz_client, raw):
    response = fuzz_client.post("/rank", content=raw, headers=JSON)
    assert response.status_code in (200, 400, 413, 422), response.text
    assert response.json()["error"] if response.status_code != 200 else response.json()["items"]
    assert fuzz_client.get("/healthz").status_code == 200


def test_scoring_pool_runs_calls_and_refuses_them_once_closed():
    pool = ScoringPool(threads=1, max_in_flight=1, timeout_s=5.0)
    assert asyncio.run(pool.run(lambda a, b: a + b, 2, 3)) == 5
    pool.close()
    assert not pool.accepting
    with pytest.raises(Overloaded):
        asyncio.run(pool.run(lambda: 1))
