"""The admin listener off loopback: health, ready and metrics stay open, every other view
needs `Authorization: Bearer $SIDECAR_ADMIN_TOKEN` (403 saying how to enable it when no
token is set); on loopback everything stays open. The token is never shown."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest

from sidecar.admin import authorized
from sidecar.config import ConfigError, load_settings
from tests.conftest import admin, chat, pool
from tests.test_config import run_cli

TOKEN = "0123456789abcdef-admin-token"
OPEN = [("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")]
PROTECTED = [("GET", "/stats"), ("GET", "/endpoints"), ("GET", "/sessions/alice"),
             ("DELETE", "/sessions/alice")]


async def call(http, running, method: str, path: str, auth: str | None = None
               ) -> tuple[int, str]:
    headers = {"Authorization": auth} if auth is not None else {}
    async with http.request(method, admin(running) + path, headers=headers) as r:
        return r.status, await r.text()


async def exposed(pods, sidecar, http, **env: str):
    """A sidecar whose admin listener binds every address (reached here via 127.0.0.1),
    with one session routed."""
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])}, SIDECAR_ADMIN_LISTEN="0.0.0.0:0", **env)
    assert (await chat(http, running, "alice"))[0] == 200
    return running


async def test_off_loopback_every_view_but_the_probes_needs_the_token(pods, sidecar, http,
                                                                      caplog):
    caplog.set_level(logging.DEBUG)
    running = await exposed(pods, sidecar, http, SIDECAR_ADMIN_TOKEN=TOKEN)
    for auth in (None, "Bearer wrong-token-of-some-length", f"Basic {TOKEN}", "Bearer",
                 f"Bearer {TOKEN}x", TOKEN):
        for method, path in OPEN:
            assert (await call(http, running, method, path, auth))[0] == 200, (path, auth)
        for method, path in PROTECTED:
            status, body = await call(http, running, method, path, auth)
            assert status == 401, (method, path, auth, status)
            assert "Authorization: Bearer" in body and TOKEN not in body
    assert running.sidecar.router.cache.peek("alice") is not None, "a refused DELETE forgot"
    for method, path in [*OPEN, *PROTECTED]:
        status, body = await call(http, running, method, path, f"Bearer {TOKEN}")
        assert status == 200, (method, path, status, body)
        assert TOKEN not in body
    assert running.sidecar.router.cache.peek("alice") is None, "the DELETE with the token"
    assert (await call(http, running, "GET", "/stats", f"bearer  {TOKEN} "))[0] == 200
    assert "SIDECAR_ADMIN_TOKEN" in json.dumps(running.sidecar.settings.redacted())
    assert TOKEN not in json.dumps(running.sidecar.settings.redacted())
    assert TOKEN not in repr(running.sidecar.settings)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


async def test_off_loopback_without_a_token_the_views_answer_403_saying_how(pods, sidecar,
                                                                            http, caplog):
    caplog.set_level(logging.WARNING)
    running = await exposed(pods, sidecar, http)
    assert any("SIDECAR_ADMIN_TOKEN is not set" in r.getMessage() for r in caplog.records)
    for auth in (None, f"Bearer {TOKEN}", "Bearer "):
        for method, path in OPEN:
            assert (await call(http, running, method, path, auth))[0] == 200, (path, auth)
        for method, path in PROTECTED:
            status, body = await call(http, running, method, path, auth)
            assert status == 403, (method, path, auth, status)
            assert "set SIDECAR_ADMIN_TOKEN" in json.loads(body)["error"]
    assert running.sidecar.router.cache.peek("alice") is not None, "a DELETE got through"


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_on_loopback_everything_stays_open(pods, sidecar, http, token):
    [pod] = await pods(1)
    env = {"SIDECAR_ADMIN_TOKEN": token} if token else {}
    running = await sidecar({"small": pool([pod])}, **env)  # 127.0.0.1
    assert (await chat(http, running, "alice"))[0] == 200
    for method, path in [*OPEN, *PROTECTED]:
        assert (await call(http, running, method, path))[0] == 200, (method, path)


def test_the_bearer_comparison():
    assert authorized(f"Bearer {TOKEN}", TOKEN)
    assert authorized(f"bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"Bearer {TOKEN[:-1]}", f"Token {TOKEN}",
                   f"Bearer {TOKEN} {TOKEN}", "Bearer ✓"):
        assert not authorized(header, TOKEN), header


@pytest.mark.parametrize("value", ["short", "has spaces in the token value", "tab\there" * 3,
                                   "ünïcödé-but-long-enough"])
def test_an_unusable_token_is_refused_without_echoing_it(value):
    pools = json.dumps({"small": {"model": "m", "endpoints": ["http://127.0.0.1:9"]}})
    with pytest.raises(ConfigError) as refused:
        load_settings({"SIDECAR_POOLS": pools, "SIDECAR_ADMIN_TOKEN": value})
    [problem] = refused.value.problems
    assert "SIDECAR_ADMIN_TOKEN" in problem and "openssl rand -hex 32" in problem
    assert value.strip() not in problem


@pytest.mark.parametrize("listen,token,warns", [("0.0.0.0:7879", None, True),
                                                ("0.0.0.0:7879", TOKEN, False),
                                                ("10.1.2.3:7879", None, True),
                                                ("127.0.0.1:7879", None, False),
                                                ("[::1]:7879", None, False)])
def test_check_warns_about_an_exposed_admin_listener_without_a_token(listen, token, warns):
    env = {"SIDECAR_POOLS": json.dumps({"small": {"model": "m",
                                                  "endpoints": ["http://127.0.0.1:9"]}}),
           "SIDECAR_ADMIN_LISTEN": listen}
    if token:
        env["SIDECAR_ADMIN_TOKEN"] = token
    done = run_cli("check", env=env)
    assert done.returncode == 0, done.stderr
    assert ("SIDECAR_ADMIN_TOKEN is not set" in done.stderr) is warns, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    shown = json.loads(done.stdout)["SIDECAR_ADMIN_TOKEN"]
    assert shown == ("<redacted>" if token else None)


async def top(running, *args: str, env_token: str | None = None) -> tuple[int, str]:
    """`llm-sidecar top --once` as its own process (the sidecar runs on this loop)."""
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "TERM": "dumb"}
    if env_token:
        env["SIDECAR_ADMIN_TOKEN"] = env_token
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "top", "--once", "--interval", "0.1",
        "--admin", admin(running), *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


async def test_top_sends_the_token_from_the_flag_or_the_variable(pods, sidecar, http):
    running = await exposed(pods, sidecar, http, SIDECAR_ADMIN_TOKEN=TOKEN)
    code, out = await top(running)
    assert code == 1 and "401" in out and "SIDECAR_ADMIN_TOKEN" in out, out
    for args, env_token in (((), TOKEN), (("--token", TOKEN), None)):
        code, out = await top(running, *args, env_token=env_token)
        assert code == 0 and "endpoints" in out, out
        assert TOKEN not in out
