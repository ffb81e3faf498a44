"""Images from lmfleet's own clients: `lmfleet chat --image` / `/image` and the chat page's
attach control (headless chromium), against a real router in front of a tiny random LLaVA
worker and a text-only worker; greedy answers equal the offline `LLM.chat`."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys

import pytest

from lmfleet.worker import LLM, SamplingParams
from tests.integration.test_router_helpers import start_router
from tests.integration.worker_process import start_worker
from tests.vision_model import image_bytes, make_tiny_llava

pytestmark = [pytest.mark.integration, pytest.mark.model]

MAX_MODEL_LEN = 512
MAX_TOKENS = 10
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PNG, JPEG = image_bytes(11), image_bytes(12, fmt="JPEG")


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def user(text: str, *images: tuple[bytes, str]) -> dict:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}, *(
        {"type": "image_url", "image_url": {"url": data_url(d, t)}} for d, t in images)]}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, default_model_dir):
    return make_tiny_llava(tmp_path_factory.mktemp("vision") / "tiny-llava", default_model_dir)


@pytest.fixture(scope="module")
def router(llava_dir):
    args = ["--max-model-len", str(MAX_MODEL_LEN)]
    with start_worker(llava_dir, args) as llava, start_worker("default", args) as text, \
            start_router([llava, text]) as router:
        yield router


@pytest.fixture(scope="module")
def offline(llava_dir):
    llm = LLM(str(llava_dir), max_model_len=MAX_MODEL_LEN)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    return lambda messages: llm.chat(messages, params, use_tqdm=False)[0].text


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pictures")
    (directory / "a.png").write_bytes(PNG)
    (directory / "b.jpg").write_bytes(JPEG)
    return directory


# ---- lmfleet chat ------------------------------------------------------------------------------


def run_chat(router, lines: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmfleet.cli", "chat", "--url", router.base_url,
         "--temperature", "0", "--max-tokens", str(MAX_TOKENS), *args],
        input="".join(f"{line}\n" for line in [*lines, "/exit"]), capture_output=True,
        text=True, timeout=180)


def answers(result: subprocess.CompletedProcess) -> list[str]:
    # stdout: each turn's prompt (">>> ") then its answer.
    return [a.strip() for a in result.stdout.split(">>> ")[1:] if a.strip()]


def test_chat_sends_image_flags_with_the_first_message(router, pictures, offline):
    result = run_chat(router, ["Compare them."], "--model", "tiny-llava",
                      "--image", str(pictures / "a.png"), "--image", str(pictures / "b.jpg"))
    assert result.returncode == 0, result.stderr
    expected = offline([user("Compare them.", (PNG, "image/png"), (JPEG, "image/jpeg"))])
    assert answers(result) == [expected.strip()]


def test_chat_attaches_an_image_to_the_next_message(router, pictures, offline):
    result = run_chat(router, ["Hello.", f"/image {pictures / 'a.png'}", "And this?"],
                      "--model", "tiny-llava")
    assert result.returncode == 0, result.stderr
    assert "[image attached:" in result.stderr
    first = offline([user("Hello.")])
    second = offline([user("Hello."), {"role": "assistant", "content": first.strip()},
                      user("And this?", (PNG, "image/png"))])
    assert answers(result) == [first.strip(), second.strip()]


def test_chat_shows_a_text_only_models_refusal_and_goes_on(router, pictures):
    result = run_chat(router, ["What is this?", "Say hello."], "--model", "default",
                      "--image", str(pictures / "a.png"))
    assert result.returncode == 0
    assert "error: messages[0].content[1]: model 'default' does not take images" in \
        result.stderr
    assert len(answers(result)) == 1  # the next turn (without the image) is answered


def test_chat_with_a_missing_image_file_is_one_line_error(router, tmp_path):
    result = run_chat(router, [], "--image", str(tmp_path / "none.png"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot read the image ")


# ---- the chat page -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(router):
    if CHROMIUM is None:  # `make test` installs it (Debian's chromium package)
        pytest.fail("chromium is not installed: run `make test`, which installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(180_000)
        page.goto(f"{router.base_url}/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 2")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", str(MAX_TOKENS))
        yield page
        browser.close()


def send_with_image(page, model: str, text: str, picture) -> None:
    page.select_option("#model", model)
    page.set_input_files("#image", str(picture))
    page.wait_for_selector("#attachments img")
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer(page, count: int):
    page.wait_for_function(
        f"document.querySelectorAll(\".message.assistant[data-done='true']\").length === {count}")
    return page.locator(".message.assistant").nth(count - 1)


def test_the_page_sends_an_attached_image(page, pictures, offline):
    send_with_image(page, "tiny-llava", "What is in the picture?", pictures / "a.png")
    answer = last_answer(page, 1)
    assert "error" not in (answer.get_attribute("class") or "")
    expected = offline([user("What is in the picture?", (PNG, "image/png"))])
    # The answer's own text (the usage line is an element after it).
    text = answer.evaluate("e => Array.from(e.childNodes).filter(n => n.nodeType === 3)"
                           ".map(n => n.textContent).join('')")
    assert text == expected
    assert page.locator(".message.user img").count() == 1
    assert page.locator("#attachments").is_hidden()  # sent: nothing attached any more


def test_the_page_shows_a_text_only_models_refusal(page, pictures):
    page.click("#new_chat")
    send_with_image(page, "default", "What is this?", pictures / "b.jpg")
    answer = last_answer(page, 1)
    assert "error" in answer.get_attribute("class")
    assert "does not take images" in answer.inner_text()
