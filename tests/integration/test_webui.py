"""The built-in chat page (router/webui/index.html) in a real headless browser: Debian's
chromium driven by playwright, against a real router and worker on the default model.

Two turns stream into the page, the second reusing the first's KV through the page's
session_id (cached_tokens > 0); a long answer is stopped from the page and the worker
sees the generation aborted; the page fetches nothing but this server's own API.
"""

from __future__ import annotations

import shutil

import pytest

from tests.integration.test_router_helpers import start_router, wait_until, worker_load
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 180_000  # a whole answer on a busy 2-core machine


@pytest.fixture(scope="module")
def router(default_model_dir):
    with start_worker(default_model_dir, ["--max-model-len", "2048"]) as worker, \
            start_router([worker]) as router:
        router.worker = worker
        yield router


@pytest.fixture(scope="module")
def page(router):
    if CHROMIUM is None:  # `make test` installs it (Debian's chromium package)
        pytest.fail("chromium is not installed: run `make test`, which installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root, where chromium's sandbox refuses.
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.requests_seen = []
        page.on("request", lambda request: page.requests_seen.append(request.url))
        page.goto(f"{router.base_url}/")
        yield page
        browser.close()


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def assistant(page, index: int):
    return page.locator(".message.assistant").nth(index)


def test_the_page_lists_the_served_model(page):
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.locator("#model option").first.inner_text() == "SmolLM2-135M-Instruct"


def test_two_turns_stream_and_the_second_reuses_the_first_turns_kv(page):
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "48")
    send(page, "Name three colours of the rainbow.")
    # Streamed: text is on the page before the answer is done.
    page.wait_for_function("""() => {
        const a = document.querySelector('.message.assistant');
        return a && a.textContent.length > 0 && !a.dataset.done; }""", polling="raf")
    page.wait_for_selector(".message.assistant[data-done='true']")
    first = assistant(page, 0)
    assert first.inner_text().strip()
    assert int(first.get_attribute("data-completion-tokens")) > 0
    send(page, "Now name three animals.")
    page.wait_for_function(
        "document.querySelectorAll(\".message.assistant[data-done='true']\").length === 2")
    second = assistant(page, 1)
    assert second.inner_text().strip()
    assert "error" not in (second.get_attribute("class") or "")
    assert int(second.get_attribute("data-cached-tokens")) > 0


def test_a_long_answer_is_stopped_and_the_server_aborts_it(page, router):
    page.fill("#max_tokens", "1500")
    send(page, "Write a very long story about a lighthouse keeper.")
    page.wait_for_function("""() => {
        const all = document.querySelectorAll('.message.assistant');
        const a = all[all.length - 1];
        return all.length === 3 && a.textContent.length > 20; }""", polling="raf")
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-stopped='true']")
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    # Closing the stream aborted the generation: the worker has nothing left running.
    assert wait_until(lambda: worker_load(router.worker).num_running == 0, 60)
    stopped = assistant(page, 2).inner_text()
    assert stopped.strip() and "stopped" in stopped


def test_new_chat_clears_the_conversation_and_nothing_is_fetched_elsewhere(page, router):
    page.click("#new_chat")
    assert page.locator(".message").count() == 0
    assert page.requests_seen
    assert all(url.startswith(router.base_url) for url in page.requests_seen), \
        page.requests_seen
