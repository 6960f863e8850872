"""The job API against the real PostgreSQL and Redis: FastAPI's TestClient for most tests, a
uvicorn process where a real server matters (restart, the HTTP client and CLI)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from byol_core.errors import ByolError
from byol_core.presets import deep_merge
from service import admission, jobs
from service.app import create_app
from service.client import ApiClient, ApiError, ApiUnreachable
from service.db import Job, Status, make_engine, make_sessions
from service.queue import Queue
from service.settings import Settings

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789", "root": "root-tok"}
MLFLOW_UI = "http://mlflow.test:5000"


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


@pytest.fixture(scope="module")
def api_settings(settings: Callable[..., Settings]) -> Settings:
    return settings(api_tokens=TOKENS, admins=["root"], mlflow_ui_url=MLFLOW_UI, poll_seconds=0.1)


@pytest.fixture(scope="module")
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def sessions(pg_url: str) -> Iterator[sessionmaker]:
    engine = make_engine(pg_url)
    yield make_sessions(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def queue(api_settings: Settings) -> Queue:
    return Queue(api_settings.redis_url, api_settings.redis_prefix)


def spec(settings: Settings, **fields: Any) -> dict[str, Any]:
    """A small valid spec with a name no other test uses, reading inside the data root."""
    base = {
        "name": f"t-{uuid.uuid4().hex[:12]}",
        "epochs": 2,
        "batch_size": 32,
        "data": {"root": str(settings.data_root)},
    }
    return deep_merge(base, fields)


def submit(client: TestClient, body: dict[str, Any], user: str = "alice", **headers: str):
    return client.post("/jobs", json=body, headers={**auth(user), **headers})


def set_job(sessions: sessionmaker, job_id: str, **values: Any) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data:"):
            yield json.loads(line[5:])


# --- create -------------------------------------------------------------------------------------


def test_create_stores_the_resolved_spec_queues_and_dispatches(
    client: TestClient, api_settings: Settings, queue: Queue
):
    body = spec(api_settings, optim={"lr": 0.05})
    created = submit(client, body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "queued" and job["owner"] == "alice" and job["attempts"] == 0
    # stored as the validated spec: defaults filled in, the submitted value kept
    assert job["spec"]["optim"] == {**job["spec"]["optim"], "lr": 0.05, "momentum": 0.9}
    assert job["spec"]["model"]["projector"]["norm"] == "batch"

    shown = client.get(f"/jobs/{job['id']}")
    assert shown.status_code == 200
    assert shown.json()["status"] == "queued"
    assert shown.json()["spec"] == job["spec"]

    messages = queue.redis.xrange(queue.stream)
    assert {"job": job["id"]} in [fields for _, fields in messages]


def test_same_idempotency_key_and_spec_returns_the_first_job(
    client: TestClient, api_settings: Settings
):
    body = spec(api_settings)
    key = str(uuid.uuid4())
    first = submit(client, body, **{"Idempotency-Key": key})
    again = submit(client, body, **{"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    listed = client.get("/jobs", params={"name": body["name"]}).json()["jobs"]
    assert [j["id"] for j in listed] == [first.json()["id"]]


def test_same_idempotency_key_with_another_spec_is_409(client: TestClient, api_settings: Settings):
    key = str(uuid.uuid4())
    assert submit(client, spec(api_settings), **{"Idempotency-Key": key}).status_code == 201
    other = submit(client, spec(api_settings, epochs=3), **{"Idempotency-Key": key})
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["detail"]


def test_idempotency_keys_belong_to_their_user(client: TestClient, api_settings: Settings):
    body, key = spec(api_settings), str(uuid.uuid4())
    alices = submit(client, body, "alice", **{"Idempotency-Key": key})
    bobs = submit(client, body, "bob", **{"Idempotency-Key": key})
    assert (alices.status_code, bobs.status_code) == (201, 201)
    assert alices.json()["id"] != bobs.json()["id"]


def test_concurrent_posts_with_one_key_create_one_job(client: TestClient, api_settings: Settings):
    body, key = spec(api_settings), str(uuid.uuid4())
    barrier = threading.Barrier(8)

    def post(_: int):
        barrier.wait()
        return submit(client, body, **{"Idempotency-Key": key})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 7 + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(client.get("/jobs", params={"name": body["name"]}).json()["jobs"]) == 1


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"model": {"encoder": {"widht": 32}}}, "model.encoder.widht"),
        ({"batch_size": "many"}, "batch_size"),
        ({"ema": {"schedule": "linear"}}, "ema.schedule"),
        ({"augment": {"crop_scale": [0.2, 1.0, 3.0]}}, "augment.crop_scale"),
        ({"data": {"name": "imagefolder"}}, "data.path"),  # a cross-field rule
        ({"batch_size": 30, "distributed": {"workers": 4}}, "batch_size"),
    ],
)
def test_invalid_spec_is_422_naming_the_field(
    client: TestClient, api_settings: Settings, fields: dict, field: str
):
    response = submit(client, spec(api_settings, **fields))
    assert response.status_code == 422
    body = response.json()
    assert field in [e["field"] for e in body["errors"]]
    assert body["detail"].startswith(field)


def sweep(settings: Settings, **fields: Any) -> dict[str, Any]:
    base = {
        "kind": "sweep",
        "name": f"s-{uuid.uuid4().hex[:12]}",
        "base": spec(settings),
        "space": {"optim.lr": {"type": "loguniform", "low": 0.01, "high": 1.0}},
        "num_samples": 2,
    }
    return deep_merge(base, fields)


def test_a_sweep_is_a_job_of_kind_sweep(client: TestClient, api_settings: Settings):
    created = submit(client, sweep(api_settings))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["kind"] == "sweep" and job["status"] == "queued"
    assert job["spec"]["space"]["optim.lr"]["type"] == "loguniform"
    assert job["spec"]["base"]["optim"]["momentum"] == 0.9  # the base stored fully resolved


@pytest.mark.parametrize(
    ("space", "field"),
    [
        ({"optim.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "space.optim.lrr"),
        ({"ema.tau": {"type": "uniform", "low": 0.999, "high": 0.99}}, "space.ema.tau"),
        ({"optim.lr": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "space.optim.lr"),
        ({"seed": {"type": "grid", "values": []}}, "space.seed"),
        (
            {"variant,seed": {"type": "grid", "values": [["byol", 0], ["byol"]]}},
            "space.variant,seed",
        ),
        ({"variant,seed": {"type": "grid", "values": [["nope", 0]]}}, "space.variant,seed"),
        ({"variant,seed": {"type": "uniform", "low": 0, "high": 1}}, "space.variant,seed"),
    ],
)
def test_a_bad_search_space_is_422_naming_it(
    client: TestClient, api_settings: Settings, space: dict, field: str
):
    body = sweep(api_settings)
    body["space"] = space
    response = submit(client, body)
    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["errors"]], response.json()


def test_a_sweep_reading_outside_the_data_root_is_422(client: TestClient, api_settings):
    body = sweep(api_settings)
    body["base"]["data"]["root"] = "/etc"
    response = submit(client, body)
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["base.data.root"]


def test_a_sweep_searching_a_path_outside_the_data_root_with_another_field_is_422(
    client: TestClient, api_settings
):
    body = sweep(api_settings)
    body["base"]["data"] |= {"name": "imagefolder", "path": str(api_settings.data_root)}
    body["space"] = {"data.path,seed": {"type": "grid", "values": [["/etc", 0]]}}
    response = submit(client, body)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["space.data.path"]


def test_malformed_bodies_are_4xx_json_never_500(client: TestClient):
    for content, content_type in [
        (b'{"epochs": ', "application/json"),
        (b"[1, 2]", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"epochs: 3", "text/plain"),
        (b"", "application/json"),
    ]:
        response = client.post(
            "/jobs", content=content, headers={**auth("alice"), "Content-Type": content_type}
        )
        assert response.status_code in (400, 422), (content, response.text)
        assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize(
    ("content_type", "status_code"),
    [
        ("application/json", 201),
        ("application/json; charset=utf-8", 201),
        ("application/vnd.byol+json", 201),
        ("text/plain", 422),
        (None, 422),
    ],
)
def test_the_body_is_json_by_its_content_type(
    client: TestClient, api_settings: Settings, content_type: str | None, status_code: int
):
    headers = auth("alice") | ({"Content-Type": content_type} if content_type else {})
    content = json.dumps(spec(api_settings)).encode()
    response = client.post("/jobs", content=content, headers=headers)
    assert response.status_code == status_code, response.text
    if status_code == 422:
        assert response.json()["detail"].startswith("Content-Type must be application/json")


def test_a_bad_idempotency_key_is_422_naming_the_header_with_the_body_errors_beside_it(
    client: TestClient, api_settings: Settings
):
    for key in ["", "k" * 201, "tab\there"]:
        response = submit(client, spec(api_settings), **{"Idempotency-Key": key})
        assert response.status_code == 422, (key, response.text)
        assert [(e["location"], e["field"]) for e in response.json()["errors"]] == [
            ("header", "idempotency-key")
        ]
    bad_lr = spec(api_settings, optim={"lr": -1})
    both = submit(client, bad_lr, **{"Idempotency-Key": "k" * 201})
    assert [e["field"] for e in both.json()["errors"]] == ["idempotency-key", "optim.lr"]
    assert submit(client, spec(api_settings), **{"Idempotency-Key": "k" * 200}).status_code == 201


def test_without_a_valid_token_the_body_is_not_even_read(client: TestClient):
    response = client.post(
        "/jobs", content=b'{"epochs": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401


@pytest.mark.parametrize(
    "fields",
    [
        {"data": {"root": "../../etc"}},
        {"data": {"root": "/etc"}},
        {"data": {"root": "~"}},
        {"data": {"name": "imagefolder", "path": "/etc"}},
        {"data": {"name": "imagefolder", "path": "{root}/../outside"}},
    ],
)
def test_dataset_path_outside_the_data_root_is_422(
    client: TestClient, api_settings: Settings, fields: dict
):
    root = str(api_settings.data_root)
    data = {k: v.replace("{root}", root) for k, v in fields["data"].items()}
    response = submit(client, spec(api_settings, data=data))
    assert response.status_code == 422, response.text
    field = "data.path" if "path" in data else "data.root"
    assert [e["field"] for e in response.json()["errors"]] == [field]


def test_symlink_out_of_the_data_root_is_422_and_paths_inside_are_accepted(
    client: TestClient, api_settings: Settings, tmp_path
):
    root = api_settings.data_root
    (root / "cifar" / "train").mkdir(parents=True, exist_ok=True)
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    inside = {"name": "imagefolder", "path": str(root / "cifar")}
    assert submit(client, spec(api_settings, data=inside)).status_code == 201
    escaping = {"name": "imagefolder", "path": str(root / "escape")}
    response = submit(client, spec(api_settings, data=escaping))
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "data.path"
    # a symlink loop inside the root resolves nowhere: refused, not passed on to a worker
    loop = root / f"loop-{uuid.uuid4().hex[:8]}"
    loop.symlink_to(loop)
    looping = {"name": "imagefolder", "path": str(loop / "train")}
    response = submit(client, spec(api_settings, data=looping))
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "data.path"


def test_text_postgres_cannot_store_is_422_not_500(client: TestClient, api_settings: Settings):
    response = submit(client, spec(api_settings, name="bad\x00name"))
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "name"


def post_raw(client: TestClient, body: dict[str, Any], *tokens: tuple[str, str]):
    """POST a body with JSON's non-standard tokens (NaN, Infinity) swapped in for the
    placeholders, as a hand-written or non-Python client can send them."""
    text = json.dumps(body)
    for placeholder, token in tokens:
        text = text.replace(json.dumps(placeholder), token)
    headers = {**auth("alice"), "Content-Type": "application/json"}
    return client.post("/jobs", content=text, headers=headers)


@pytest.mark.parametrize("token", ["Infinity", "-Infinity", "NaN"])
def test_a_non_finite_number_is_422_naming_its_field(
    client: TestClient, api_settings: Settings, token: str
):
    # PostgreSQL's JSON has no NaN or Infinity: these were a 500 at INSERT time
    train = post_raw(client, spec(api_settings, optim={"lr": "@x"}), ("@x", token))
    assert train.status_code == 422, train.text
    assert train.json()["errors"][0]["field"] == "optim.lr"
    values = {"optim.lr": {"type": "grid", "values": [0.1, "@x"]}}
    search = post_raw(client, sweep(api_settings, space=values), ("@x", token))
    assert search.status_code == 422, search.text
    assert search.json()["errors"][0]["field"].startswith("space.optim.lr")


def test_the_words_nan_and_infinity_as_text_are_stored(client: TestClient, api_settings):
    named = spec(api_settings, name=f"NaN-Infinity-{uuid.uuid4().hex[:8]}")
    response = submit(client, named)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == named["name"]


def test_admission_finds_a_non_finite_number_anywhere_in_the_stored_spec():
    document = {"name": "x", "space": {"k": {"values": [1.0, [2.0, float("inf")]]}}}
    canonical = jobs.canonical(document)
    assert not admission.storable(canonical)
    assert list(admission.unstorable(document)) == [
        ("space.k.values.1.1", "must be a finite number (got inf)")
    ]
    assert admission.storable(jobs.canonical({"name": "NaN", "lr": 0.1})) is False  # walked
    assert list(admission.unstorable({"name": "NaN", "lr": 0.1})) == []


def test_oversized_body_is_413_whether_declared_or_streamed(
    client: TestClient, api_settings: Settings
):
    big = json.dumps(spec(api_settings, name="x" * 100, pad="y" * 70_000)).encode()
    declared = client.post("/jobs", content=big, headers={**auth("alice")})
    assert declared.status_code == 413
    assert "bytes" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting catches it
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    streamed = client.post(
        "/jobs", content=chunks(), headers={**auth("alice"), "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert streamed.json()["detail"].startswith("request body larger than")


def test_unknown_job_is_404(client: TestClient):
    unknown = str(uuid.uuid4())
    for response in [
        client.get(f"/jobs/{unknown}"),
        client.get(f"/jobs/{unknown}/events"),
        client.post(f"/jobs/{unknown}/cancel", headers=auth("alice")),
    ]:
        assert response.status_code == 404
        assert response.json()["detail"] == f"no job {unknown!r}"
    assert client.get("/jobs/not-a-job-id").status_code == 404


# --- authentication -----------------------------------------------------------------------------


def test_writes_without_a_valid_token_are_401_and_store_nothing(
    client: TestClient, api_settings: Settings
):
    body = spec(api_settings)
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YTpi"}]:
        response = client.post("/jobs", json=body, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/jobs", params={"name": body["name"]}).json()["jobs"] == []
    job = submit(client, body).json()
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 401


def test_without_configured_tokens_writes_say_to_set_byol_api_tokens(
    settings: Callable[..., Settings],
):
    with TestClient(create_app(settings(api_tokens={}))) as bare:
        response = bare.post("/jobs", json={}, headers={"Authorization": "Bearer anything"})
    assert response.status_code == 401
    assert "BYOL_API_TOKENS" in response.json()["detail"]


def test_only_the_owner_or_an_admin_may_cancel(client: TestClient, api_settings: Settings):
    job = submit(client, spec(api_settings), "alice").json()
    forbidden = client.post(f"/jobs/{job['id']}/cancel", headers=auth("bob"))
    assert forbidden.status_code == 403
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
    by_admin = client.post(f"/jobs/{job['id']}/cancel", headers=auth("root"))
    assert by_admin.status_code == 200
    assert by_admin.json()["status"] == "cancelled"


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_queued_job_then_finished_job_is_409(
    client: TestClient, api_settings: Settings, sessions: sessionmaker
):
    job = submit(client, spec(api_settings)).json()
    cancelled = client.post(f"/jobs/{job['id']}/cancel", headers=auth("alice"))
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    # twice is harmless
    assert client.post(f"/jobs/{job['id']}/cancel", headers=auth("alice")).status_code == 200

    done = submit(client, spec(api_settings)).json()
    set_job(sessions, done["id"], status=Status.succeeded)
    conflict = client.post(f"/jobs/{done['id']}/cancel", headers=auth("alice"))
    assert conflict.status_code == 409
    assert client.get(f"/jobs/{done['id']}").json()["status"] == "succeeded"


def test_cancel_running_job_asks_its_worker(
    client: TestClient, api_settings: Settings, sessions: sessionmaker
):
    job = submit(client, spec(api_settings)).json()
    with sessions() as session:
        assert jobs.claim(session, "worker-1", 30, job_id=job["id"]) is not None
    response = client.post(f"/jobs/{job['id']}/cancel", headers=auth("alice"))
    assert response.status_code == 200
    assert response.json()["status"] == "cancelling"
    assert response.json()["cancel_requested"] is True


# --- reading ------------------------------------------------------------------------------------


def test_job_shows_progress_mlflow_link_result_and_error(
    client: TestClient, api_settings: Settings, sessions: sessionmaker
):
    ok = submit(client, spec(api_settings)).json()
    with sessions() as session:
        jobs.claim(session, "w", 30, job_id=ok["id"])
        jobs.record(
            session,
            ok["id"],
            "w",
            mlflow_run_id="abc123",
            progress={
                "epoch": 1,
                "epochs": 2,
                "metrics": {"train/loss": 1.5, "note": "text"},
                "experiment_id": "7",
            },
        )
    running = client.get(f"/jobs/{ok['id']}").json()
    assert running["status"] == "running" and running["attempts"] == 1
    assert running["progress"] == {
        "epoch": 1,
        "epochs": 2,
        "metrics": {"train/loss": 1.5, "note": None},
    }
    assert running["mlflow"] == {
        "run_id": "abc123",
        "experiment_id": "7",
        "url": f"{MLFLOW_UI}/#/experiments/7/runs/abc123",
    }
    summary = {"linear_top1": 0.36, "knn_top1": 0.3, "cos_pos": 0.7, "cos_neg": 0.4}
    with sessions() as session:
        jobs.finish(session, ok["id"], "w", Status.succeeded, result={**summary, "z_std": 0.08})
    done = client.get(f"/jobs/{ok['id']}").json()
    assert done["status"] == "succeeded"
    assert done["result"] == {**summary, "z_std": 0.08, "checkpoint": None}

    failed = submit(client, spec(api_settings)).json()
    with sessions() as session:
        jobs.claim(session, "w", 30, job_id=failed["id"])
        jobs.record(session, failed["id"], "w", mlflow_run_id="r2")  # experiment unknown
        jobs.finish(session, failed["id"], "w", Status.failed, error="DataError: no data")
    shown = client.get(f"/jobs/{failed['id']}").json()
    assert shown["error"] == "DataError: no data"
    assert shown["mlflow"] == {"run_id": "r2", "experiment_id": None, "url": None}


def test_list_filters_by_status_and_name(
    client: TestClient, api_settings: Settings, sessions: sessionmaker
):
    name = f"t-{uuid.uuid4().hex[:12]}"
    ids = [submit(client, spec(api_settings, name=name)).json()["id"] for _ in range(3)]
    client.post(f"/jobs/{ids[0]}/cancel", headers=auth("alice"))
    submit(client, spec(api_settings))  # another name

    everything = client.get("/jobs", params={"name": name}).json()
    assert [j["id"] for j in everything["jobs"]] == ids[::-1]  # newest first
    assert everything["next_cursor"] is None
    queued = client.get("/jobs", params={"name": name, "status": "queued"}).json()["jobs"]
    assert [j["id"] for j in queued] == ids[:0:-1]
    cancelled = client.get("/jobs", params={"name": name, "status": "cancelled"}).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert "spec" not in cancelled[0]  # lists stay light; GET /jobs/{id} has it
    assert client.get("/jobs", params={"status": "sleeping"}).status_code == 422


def test_cursor_walks_every_page_exactly_once(client: TestClient, api_settings: Settings):
    name = f"t-{uuid.uuid4().hex[:12]}"
    created = [submit(client, spec(api_settings, name=name)).json()["id"] for _ in range(7)]
    seen, pages, cursor = [], 0, None
    while True:
        params = {"name": name, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/jobs", params=params).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        if pages == 1:  # created meanwhile: ahead of the walk, never inside it
            submit(client, spec(api_settings, name=name))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == created[::-1]


@pytest.mark.parametrize(
    ("params", "field"),
    [({"cursor": "garbage"}, "cursor"), ({"limit": 0}, "limit"), ({"limit": 1000}, "limit")],
)
def test_bad_list_parameters_are_422_naming_them(client: TestClient, params, field):
    response = client.get("/jobs", params=params)
    assert response.status_code == 422
    assert response.json()["errors"][0] == {**response.json()["errors"][0], "field": field}
    assert response.json()["errors"][0]["location"] == "query"


# --- health and Redis outages -------------------------------------------------------------------


def test_healthz_and_readyz(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": True, "redis": True}


@pytest.fixture(scope="module")
def redis_down_client(settings: Callable[..., Settings]) -> Iterator[TestClient]:
    from conftest import free_port

    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    down = settings(api_tokens=TOKENS, redis_url=closed, poll_seconds=0.1)
    with TestClient(create_app(down)) as test_client:
        yield test_client


def test_with_redis_down_readyz_is_503_and_posts_still_queue_in_sql(
    redis_down_client: TestClient, api_settings: Settings, sessions: sessionmaker
):
    ready = redis_down_client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "database": True, "redis": False}

    response = submit(redis_down_client, spec(api_settings))
    assert response.status_code == 201
    with sessions() as session:
        assert jobs.get_job(session, response.json()["id"]).status == "queued"
        assert response.json()["id"] in jobs.unfinished_queued(session)


# --- events -------------------------------------------------------------------------------------


def test_events_stream_current_state_then_worker_events_until_terminal(
    client: TestClient, api_settings: Settings, sessions: sessionmaker, queue: Queue
):
    job = submit(client, spec(api_settings)).json()
    queue.publish(job["id"], {"status": "queued"})  # history before the stream: not replayed
    with sessions() as session:
        jobs.claim(session, "w", 30, job_id=job["id"])
        jobs.record(session, job["id"], "w", progress={"epoch": 1, "epochs": 2, "metrics": {}})
    received = []
    with client.stream("GET", f"/jobs/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(response.iter_lines()):
            received.append(event)
            if len(received) == 1:  # the current state came first: now the worker speaks
                progress = {"epoch": 2, "epochs": 2, "metrics": {"train/loss": 0.5}}
                queue.publish(job["id"], {"status": "running", "progress": progress})
                queue.publish(job["id"], {"status": "bogus"})  # not a status: skipped
                queue.publish(job["id"], {"status": "succeeded"})
                queue.publish(job["id"], {"status": "running"})  # after the end: never seen
    assert [(e["status"], (e["progress"] or {}).get("epoch")) for e in received] == [
        ("running", 1),
        ("running", 2),
        ("succeeded", None),
    ]
    assert received[1]["progress"]["metrics"] == {"train/loss": 0.5}
    assert all(e["job_id"] == job["id"] for e in received)


def test_events_of_a_finished_job_are_its_state_alone(client: TestClient, api_settings):
    job = submit(client, spec(api_settings)).json()
    client.post(f"/jobs/{job['id']}/cancel", headers=auth("alice"))
    with client.stream("GET", f"/jobs/{job['id']}/events") as response:
        assert [e["status"] for e in sse_events(response.iter_lines())] == ["cancelled"]


def test_events_end_when_sql_says_finished_without_an_event(
    client: TestClient, api_settings: Settings, sessions: sessionmaker
):
    job = submit(client, spec(api_settings)).json()
    with client.stream("GET", f"/jobs/{job['id']}/events") as response:
        statuses = []
        for event in sse_events(response.iter_lines()):
            statuses.append(event["status"])
            # e.g. a worker that died after settling the job but before publishing
            set_job(sessions, job["id"], status=Status.failed, error="worker lost")
    assert statuses == ["queued", "failed"]


def test_events_poll_sql_when_redis_is_down(
    redis_down_client: TestClient, api_settings: Settings, sessions: sessionmaker
):
    job = submit(redis_down_client, spec(api_settings)).json()
    with redis_down_client.stream("GET", f"/jobs/{job['id']}/events") as response:
        received = []
        for event in sse_events(response.iter_lines()):
            received.append(event)
            if len(received) == 1:
                with sessions() as session:
                    jobs.claim(session, "w", 30, job_id=job["id"])
                    progress = {"epoch": 1, "epochs": 2, "metrics": {}}
                    jobs.record(session, job["id"], "w", progress=progress)
            elif len(received) == 2:
                with sessions() as session:
                    jobs.finish(session, job["id"], "w", Status.succeeded, result={})
    assert [e["status"] for e in received] == ["queued", "running", "succeeded"]
    assert received[1]["progress"]["epoch"] == 1


# --- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_documents_every_operation(client: TestClient):
    schema = client.get("/openapi.json").json()
    operations = {
        (method.upper(), path): op
        for path, item in schema["paths"].items()
        for method, op in item.items()
    }
    assert set(operations) == {
        ("POST", "/jobs"),
        ("GET", "/jobs"),
        ("GET", "/jobs/{job_id}"),
        ("POST", "/jobs/{job_id}/cancel"),
        ("GET", "/jobs/{job_id}/events"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    }
    for key, op in operations.items():
        assert op["summary"] and op["description"] and op["tags"], key
        ok = next(code for code in op["responses"] if code.startswith("2"))
        assert op["responses"][ok]["content"], key
    assert set(operations["POST", "/jobs"]["responses"]) >= {
        "200",
        "201",
        "401",
        "409",
        "413",
        "422",
    }
    assert set(operations["POST", "/jobs/{job_id}/cancel"]["responses"]) >= {
        "401",
        "403",
        "404",
        "409",
    }
    assert operations["POST", "/jobs"]["security"] == [{"HTTPBearer": []}]
    # service.submit_route parses POST /jobs itself; the document still comes from its signature
    (key,) = operations["POST", "/jobs"]["parameters"]
    assert (key["name"], key["in"], key["required"]) == ("idempotency-key", "header", False)
    declared = next(s for s in key["schema"]["anyOf"] if s.get("type") == "string")
    assert (declared["minLength"], declared["maxLength"]) == (1, 200)
    body = operations["POST", "/jobs"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["oneOf"] == [
        {"$ref": "#/components/schemas/JobSpec"},
        {"$ref": "#/components/schemas/SweepSpec"},
    ]


# The schema comes from an app that is never started (the OpenAPI document needs no database);
# the requests go to one that is. (schemathesis.pytest.from_fixture would load it lazily, but
# it relies on a pytest internal that pytest 9 removed.)
fuzzed = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())


@pytest.fixture(scope="module")
def fuzz_app(api_settings: Settings) -> Iterator[Any]:
    # Data root "/": generated dataset paths are all inside it, so valid specs get past the
    # path check and into SQL instead of stopping at a 422.
    app = create_app(api_settings.model_copy(update={"data_root": Path("/")}))
    yield app
    # schemathesis started its lifespan; end it while the database still exists
    schemathesis.python.asgi.shutdown_lifespans()


@fuzzed.parametrize()
@hypothesis.settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_fuzzed_requests_never_get_a_server_error(case, fuzz_app):
    # a valid token on every request, so the authenticated paths are fuzzed too
    case.call_and_validate(
        app=fuzz_app, headers=auth("alice"), checks=[not_a_server_error], timeout=10
    )


# --- a real server: restart, client and CLI ----------------------------------------------------


def test_api_restart_loses_nothing(api_server, api_settings: Settings):
    first = api_server(api_settings)
    keys = {}
    with ApiClient(first.url, TOKENS["alice"]) as api:
        for _ in range(4):
            key = str(uuid.uuid4())
            keys[api.submit(spec(api_settings), idempotency_key=key)["id"]] = key
        cancelled = next(iter(keys))
        api.cancel(cancelled)
        before = {job_id: api.status(job_id) for job_id in keys}
    first.kill()  # SIGKILL: nothing is flushed or handed over on the way out

    second = api_server(api_settings)
    with ApiClient(second.url, TOKENS["alice"]) as api:
        after = {job_id: api.status(job_id) for job_id in keys}
        assert after == before
        assert after[cancelled]["status"] == "cancelled"
        assert {j["status"] for k, j in after.items() if k != cancelled} == {"queued"}
        # idempotency keys survive too: a retry after the restart gets the same job
        for job_id, key in keys.items():
            assert api.submit(before[job_id]["spec"], idempotency_key=key)["id"] == job_id


def test_client_and_cli_against_a_server(api_server, api_settings: Settings, tmp_path, capsys):
    from byol_core.cli import main

    server = api_server(api_settings)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"name: cli-{uuid.uuid4().hex[:8]}\nepochs: 1\ndata:\n  root: {api_settings.data_root}\n"
    )
    env = {"BYOL_API_URL": server.url, "BYOL_API_TOKEN": TOKENS["bob"]}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert main(["submit", str(spec_file), "--preset", "no_norm", "--set", "seed=3"]) == 0
        job = json.loads(capsys.readouterr().out)
        assert job["status"] == "queued" and job["owner"] == "bob"

        assert main(["status", job["id"]]) == 0
        assert json.loads(capsys.readouterr().out)["id"] == job["id"]

        with ApiClient() as api:
            stored = api.status(job["id"])["spec"]
            # resolved as `byol train` resolves the same file and flags
            assert (stored["variant"], stored["seed"], stored["epochs"]) == ("no_norm", 3, 1)
            assert stored["model"]["projector"]["norm"] == "none"
            api.http.headers["Authorization"] = f"Bearer {TOKENS['bob']}"
            api.cancel(job["id"])
            assert api.wait(job["id"], timeout=10)["status"] == "cancelled"
            with pytest.raises(ApiError) as missing:
                api.status(str(uuid.uuid4()))
            assert missing.value.status_code == 404

        patch.setenv("BYOL_API_TOKEN", "wrong")
        with pytest.raises(SystemExit) as refused:
            main(["submit", str(spec_file)])
        assert refused.value.code == 2
        assert "HTTP 401" in capsys.readouterr().err

    server.stop()
    with pytest.raises(ApiUnreachable, match="cannot reach"):
        ApiClient(server.url).status(job["id"])
    with pytest.raises(ByolError):
        ApiClient(server.url, "t").submit({}, attempts=1)


def test_layering_client_and_cli_import_no_torch():
    import subprocess
    import sys

    code = "import sys, service.cli, service.app; assert 'torch' not in sys.modules"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert done.returncode == 0, done.stderr
