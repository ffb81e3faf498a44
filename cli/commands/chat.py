"""`lmfleet chat`: a terminal chat with an lmfleet (or any OpenAI-compatible) endpoint.

Each line you type is a user turn; the answer streams as it arrives (POST
/v1/chat/completions, `stream: true`). The whole conversation is sent each turn with a
`session_id`, so the worker keeps the conversation's KV between turns and prefills only
the new tokens. Commands: `/reset` (forget the conversation; new session id), `/image
FILE` (attach an image to your next message), `/exit` or `/quit` (also Ctrl-D), `/help`.

Images (for a vision-language model): `--image FILE` (repeatable) goes with the first
message, `/image FILE` with the next one; each is sent as a data URL content part and
stays in the conversation. A turn that fails or is interrupted drops its images (a
text-only model's refusal is shown, and the chat goes on).

Ctrl-C while an answer streams stops that answer: the stream is closed, which aborts the
generation on the server, and the interrupted turn is left out of the history. Ctrl-C at
the prompt discards the line. An unreachable server or a rejected API key: one line
`error: ...` on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import uuid
from typing import Any, Optional

PROMPT = ">>> "
HELP = ("/reset clears the conversation, /image FILE attaches an image to your next "
        "message, /exit (or Ctrl-D) quits, Ctrl-C stops an answer")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a served model in the terminal (streaming, multi-turn)",
        description="Chat with a model behind an OpenAI-compatible endpoint such as "
        f"`lmfleet serve`. {HELP}.",
    )
    p.add_argument("--url", default="http://localhost:8000",
                   help="the server's base URL (default http://localhost:8000)")
    p.add_argument("--model", default=None,
                   help="model name (default: the server's only model)")
    p.add_argument("--api-key", default=None,
                   help="API key (default: $LMFLEET_API_KEY; none: no key)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    p.add_argument("--image", action="append", default=None, metavar="FILE",
                   help="an image (PNG, JPEG, ...) sent with your first message, for a "
                   "vision-language model (repeatable)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="longest answer in tokens (default 512)")
    p.add_argument("--show-usage", action="store_true",
                   help="after each answer print token usage and the session id (stderr)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="connect timeout")
    p.set_defaults(func=run)


class ChatError(Exception):
    """The server refused or failed a turn; the message is for the user."""


class ChatSession:
    """The conversation so far, its session id and the images waiting for the next
    message (content parts)."""

    def __init__(self, system: Optional[str]) -> None:
        self.system = system
        self.pending_images: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """A new conversation (images attached for the next message stay attached)."""
        self.session_id = f"chat-{uuid.uuid4().hex}"
        self.messages: list[dict[str, Any]] = (
            [{"role": "system", "content": self.system}] if self.system else [])

    def user_message(self, text: str) -> dict[str, Any]:
        """The next user turn, with the pending images after its text (taken from the
        pending list: a turn that fails does not resend them)."""
        images, self.pending_images = self.pending_images, []
        if not images:
            return {"role": "user", "content": text}
        return {"role": "user", "content": [{"type": "text", "text": text}, *images]}


def image_part(path: str) -> dict[str, Any]:
    """An OpenAI image content part holding the file as a data URL. Raises ChatError when
    the file cannot be read (the server checks that it is an image)."""
    import base64
    import mimetypes

    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ChatError(f"cannot read the image {path!r}: {error.strerror}") from None
    media_type = mimetypes.guess_type(path)[0] or ""
    if not media_type.startswith("image/"):
        media_type = "image/png"  # a guess only: the server reads the bytes themselves
    url = f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
    return {"type": "image_url", "image_url": {"url": url}}


def _error_message(response) -> str:
    try:
        body = json.loads(response.read())
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _check_server(client, model: Optional[str]) -> str:
    """The model to talk to; raises ChatError when the server cannot be used."""
    import httpx

    try:
        response = client.get("/v1/models")
    except httpx.HTTPError as error:
        raise ChatError(f"cannot reach the server at {client.base_url} "
                        f"({type(error).__name__}: {error or 'no answer'})") from None
    if response.status_code == 401:
        raise ChatError(f"the server at {client.base_url} rejected the API key "
                        "(use --api-key or $LMFLEET_API_KEY)")
    if response.status_code != 200:
        raise ChatError(f"GET /v1/models failed: {_error_message(response)}")
    names = [card["id"] for card in response.json().get("data", [])]
    if model is not None:
        if model not in names:
            raise ChatError(f"the server does not serve {model!r} (it serves: "
                            f"{', '.join(names) or 'nothing yet'})")
        return model
    if len(names) != 1:
        raise ChatError(f"the server serves {', '.join(names) or 'no model'}: pick one with "
                        "--model")
    return names[0]


def stream_answer(client, body: dict, write) -> tuple[str, Optional[dict]]:
    """Send one turn; `write(text)` each delta as it arrives. Returns (answer, usage).

    Raises ChatError for an error answer; KeyboardInterrupt propagates after the stream
    is closed (closing it aborts the generation on the server)."""
    parts: list[str] = []
    usage = None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise ChatError(_error_message(response))
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise ChatError(event["error"].get("message", "generation failed"))
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    write(text)
    return "".join(parts), usage


def _usage_line(usage: Optional[dict], session_id: str) -> str:
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return (f"[usage: prompt_tokens={usage.get('prompt_tokens')} cached_tokens={cached} "
            f"completion_tokens={usage.get('completion_tokens')} session_id={session_id}]")


def _attach(session: ChatSession, path: str) -> None:
    if not path:
        print("usage: /image FILE", file=sys.stderr, flush=True)
        return
    try:
        session.pending_images.append(image_part(path))
    except ChatError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return
    print(f"[image attached: {path}; it goes with your next message]", file=sys.stderr,
          flush=True)


def _read_line() -> Optional[str]:
    """The next input line; None at end of input. Ctrl-C discards the line."""
    while True:
        try:
            return input(PROMPT)
        except EOFError:
            return None
        except KeyboardInterrupt:
            print(file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import signal

    import httpx

    # A process started in the background by a non-interactive shell inherits SIGINT as
    # ignored, and Python then never raises KeyboardInterrupt: Ctrl-C must always stop an
    # answer here, so take the signal back explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.max_tokens < 1:
        raise ValueError(f"invalid --max-tokens {args.max_tokens}: must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"invalid --temperature {args.temperature}: must be >= 0")
    with contextlib.suppress(ImportError):  # absent on some platforms; chat works without
        import readline  # noqa: F401  (line editing and history for input())
    api_key = args.api_key or os.environ.get("LMFLEET_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def new_client() -> httpx.Client:
        # No read timeout: an answer may take long to start when the server is busy.
        return httpx.Client(base_url=args.url.rstrip("/"), headers=headers,
                            timeout=httpx.Timeout(None, connect=args.timeout))

    try:  # a file that cannot be read is reported before the server is asked anything
        images = [image_part(path) for path in args.image or ()]
    except ChatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    client = new_client()
    try:
        model = _check_server(client, args.model)
    except ChatError as error:
        client.close()
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"chatting with {model} at {args.url} ({HELP})", file=sys.stderr, flush=True)
    session = ChatSession(args.system)
    session.pending_images = images

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        while True:
            line = _read_line()
            if line is None or line.strip() in ("/exit", "/quit"):
                return 0
            line = line.strip()
            if not line:
                continue
            if line == "/reset":
                session.reset()
                print("[conversation cleared]", file=sys.stderr, flush=True)
                continue
            if line == "/help":
                print(HELP, file=sys.stderr, flush=True)
                continue
            if line.startswith("/image ") or line == "/image":
                _attach(session, line[len("/image"):].strip())
                continue
            messages = [*session.messages, session.user_message(line)]
            body = {"model": model, "messages": messages, "stream": True,
                    "stream_options": {"include_usage": True}, "session_id": session.session_id,
                    "temperature": args.temperature, "max_tokens": args.max_tokens}
            try:
                answer, usage = stream_answer(client, body, write)
            except KeyboardInterrupt:
                write("\n")
                print("[interrupted]", file=sys.stderr, flush=True)
                client.close()  # its connection may be half-read; start clean
                client = new_client()
                continue
            except ChatError as error:
                write("\n")
                print(f"error: {error}", file=sys.stderr, flush=True)
                continue
            except httpx.HTTPError as error:
                write("\n")
                print(f"error: the request failed ({type(error).__name__}: {error})",
                      file=sys.stderr, flush=True)
                continue
            write("\n")
            session.messages = [*messages, {"role": "assistant", "content": answer}]
            if args.show_usage:
                print(_usage_line(usage, session.session_id), file=sys.stderr, flush=True)
    finally:
        client.close()

