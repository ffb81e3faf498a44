"""`lmfleet chat` driven through a pseudo-terminal (pexpect) against a real `lmfleet serve`."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pexpect
import pytest

from tests.integration.serve_process import WORKER_TOKEN, start_serve
from tests.integration.test_router_helpers import wait_until, worker_load

pytestmark = [pytest.mark.integration, pytest.mark.model]

TIMEOUT = 180  # one answer on a busy 2-core machine
USAGE = re.compile(r"\[usage: prompt_tokens=(\d+) cached_tokens=(\d+) completion_tokens=(\d+) "
                   r"session_id=(\S+)\]")


@pytest.fixture(scope="module")
def serve():
    with start_serve(["--num-kv-blocks", "256"]) as process:
        yield process


def _spawn(url: str, *extra: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "lmfleet.cli", "chat", "--url", url,
                                           "--temperature", "0", "--show-usage", *extra],
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 400))
    child.expect("chatting with default")
    child.expect_exact(">>> ")
    return child


def _turn(child: pexpect.spawn, text: str) -> tuple[str, dict]:
    """Send one line; return the printed answer and its usage."""
    child.sendline(text)
    child.expect(USAGE)
    printed = child.before.replace("\r", "")
    answer = printed.split(text, 1)[-1].strip()  # drop the terminal's echo of our line
    prompt, cached, completion, session = child.match.groups()
    child.expect_exact(">>> ")
    return answer, {"prompt": int(prompt), "cached": int(cached),
                    "completion": int(completion), "session": session}


def _exit(child: pexpect.spawn) -> int:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_two_turns_share_a_session_and_exit_returns_0(serve):
    child = _spawn(serve.base_url, "--max-tokens", "24")
    first, usage1 = _turn(child, "What is the capital of France?")
    second, usage2 = _turn(child, "And what is the capital of Italy?")
    assert first and second
    assert usage2["session"] == usage1["session"]
    # The whole conversation was sent: the second prompt holds the first turn and answer.
    assert usage2["prompt"] > usage1["prompt"] + usage1["completion"]
    # ... and the server reused the first turn's KV instead of prefilling it again.
    assert usage2["cached"] >= 16
    assert _exit(child) == 0


def test_reset_forgets_the_conversation(serve):
    child = _spawn(serve.base_url, "--max-tokens", "16")
    answer1, usage1 = _turn(child, "Say hello.")
    _turn(child, "Now say goodbye.")
    child.sendline("/reset")
    child.expect_exact("[conversation cleared]")
    child.expect_exact(">>> ")
    answer3, usage3 = _turn(child, "Say hello.")
    assert usage3["session"] != usage1["session"]
    assert usage3["prompt"] == usage1["prompt"]  # history gone: the same first prompt
    assert answer3 == answer1  # greedy
    child.sendeof()  # Ctrl-D also quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_but_not_the_chat(serve):
    # A 1500-token answer streams for far longer than the test takes to interrupt it, on
    # a quiet machine too (a 400-token one once finished before the Ctrl-C landed).
    child = _spawn(serve.base_url, "--max-tokens", "1500")
    child.sendline("Write a very long story about a lighthouse keeper and a storm.")
    child.expect_exact("storm.\r\n")  # the terminal's echo of our line
    child.expect(r"\w")  # the answer is streaming
    child.sendintr()
    child.expect_exact("[interrupted]")
    # Closing the stream aborted the generation: the worker is idle well before a
    # 1500-token answer could have finished.
    (worker,) = serve.worker_addresses
    assert wait_until(lambda: worker_load(worker, WORKER_TOKEN).num_running == 0, timeout=5.0)
    child.expect_exact(">>> ")
    answer, usage = _turn(child, "Say hello.")
    assert answer
    # The interrupted turn is not in the history: this is a one-message conversation.
    fresh = _spawn(serve.base_url, "--max-tokens", "4")
    _, fresh_usage = _turn(fresh, "Say hello.")
    assert usage["prompt"] == fresh_usage["prompt"]
    assert _exit(fresh) == 0
    assert _exit(child) == 0


def test_unreachable_server_is_one_line_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "lmfleet.cli", "chat", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the server at http://127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1
