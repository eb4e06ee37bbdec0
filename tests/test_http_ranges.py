"""Integers beyond the database's range at the HTTP edge (issue 14 item 9), on a real `edge-server
serve`: a round id of 10^30 or a version of 23 digits used to reach SQLite and come back as an HTTP
500; now a 422 with a JSON reason, before the database. No bundle is published: the range check
needs none, and the old code reached the database without one too."""

from __future__ import annotations

import pytest

from edge_runtime.sync import protocol
from edge_runtime.sync.client import Client, enroll

from .server_util import ServerProcess, edge_server

HUGE = (10**30, 10**22 + 7, 2**31)  # 2**31: one past PostgreSQL's INTEGER


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    home = root / "home"
    assert edge_server("init", "--home", str(home), "--min-clients", "3", "--round-seconds", "3600").returncode == 0
    srv = ServerProcess(home, None).start()
    try:
        token = edge_server("token", "--home", str(home), "--clinic", "c1").stdout.strip()
        enroll(root / "c1", srv.url, token, "x25519")
        client = Client(root / "c1", retries=0, timeout=20)
        yield srv, client
    finally:
        srv.stop()


def _signed(client: Client, method: str, path: str, body: bytes = b""):
    headers = {"Content-Type": "application/json",
               **protocol.sign_request(client.key, client.config.clinic, method, path, body)}
    return client.http.request(method, path, content=body, headers=headers)


def _refused_422(resp, needle: str) -> None:
    assert resp.status_code == 422, (resp.status_code, resp.text[:300])
    reason = resp.json()["error"]
    assert needle in reason and "less than or equal to 2147483647" in reason, reason


@pytest.mark.parametrize("value", HUGE)
def test_huge_version_in_the_path_is_a_422(live, value):
    _, client = live
    _refused_422(_signed(client, "GET", f"/v1/bundle/{value}/manifest.json"), "path.version")
    _refused_422(_signed(client, "GET", f"/v1/bundle/{value}/files/head.npz"), "path.version")


@pytest.mark.parametrize("field", ["round", "base_version"])
@pytest.mark.parametrize("value", HUGE)
def test_huge_round_or_base_version_in_an_envelope_is_a_422(live, field, value):
    _, client = live
    ids = {"round": 1, "base_version": 1, field: value}
    env = protocol.Envelope.build(client.key, f"u-{field}-{value}", client.config.clinic, ids["round"], ids["base_version"],
                                  client.config.kem, b"sealed")
    _refused_422(_signed(client, "POST", "/v1/updates", env.to_json()), field)


def test_in_range_ids_still_reach_the_service(live):
    srv, client = live
    resp = _signed(client, "GET", f"/v1/bundle/{2**31 - 1}/manifest.json")
    assert resp.status_code == 404 and "no model version" in resp.json()["error"]
    env = protocol.Envelope.build(client.key, "u-ok", client.config.clinic, 7, 1, client.config.kem, b"sealed")
    resp = _signed(client, "POST", "/v1/updates", env.to_json())
    assert resp.status_code == 404 and "unknown round 7" in resp.json()["error"]
    assert srv.proc.poll() is None
