"""The chat page is served at / unless turned off, and is self-contained (in-process
router, no model)."""

from __future__ import annotations

import asyncio
import re

import httpx

from lmfleet.router.server import Router, RouterConfig


async def get(path: str = "/", **options) -> httpx.Response:
    config = RouterConfig(store_url="memory://", http_port=0, grpc_port=0,
                          discovery_timeout=0, **options)
    async with Router(config) as router:
        async with httpx.AsyncClient(base_url=f"http://{router.http_address}") as client:
            return await client.get(path)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_the_chat_page_is_served_at_the_root_and_fetches_only_this_server():
    response = run(get())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "/v1/chat/completions" in page and "/v1/models" in page and "session_id" in page
    # No CDN, no external script, style or font: every URL it names is this server's.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"""fetch\(\s*["'](https?:)?//""", page)


def test_the_page_needs_no_api_key_the_api_behind_it_does():
    # The key is typed into the page, which sends it with each API call.
    assert run(get("/", api_key="secret")).status_code == 200
    assert run(get("/v1/models", api_key="secret")).status_code == 401


def test_no_webui_turns_the_page_off():
    assert run(get("/", webui=False)).status_code == 404
