"""`lmfleet generate`: run the engine in-process on one prompt and stream the text.

Streaming decodes the whole output each step and prints the new suffix, holding back a
trailing U+FFFD so a multi-byte character split across tokens is never printed broken.
"""

from __future__ import annotations

import argparse
import sys
import uuid


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text for one prompt with the in-process engine",
        description="Load the model in this process and generate a continuation of PROMPT "
        "(with --chat: the model's answer to PROMPT as a user message).",
    )
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default="default",
                   help="model directory, .gguf file, or 'default' (embedded SmolLM2)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmfleet.worker import LLM, SamplingParams
    from lmfleet.worker.request import Request

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    if args.chat:
        prompt_ids = llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = llm.tokenizer.encode(args.prompt)
    if not args.stream:
        output = llm.generate([prompt_ids], params, use_tqdm=False)[0]
        print(output.text)
        return 0
    engine = llm.engine
    engine.validate(prompt_ids)
    request = engine.add_request(Request(uuid.uuid4().hex, prompt_ids, params))
    printed = ""
    while engine.has_work():
        engine.step()
        text = llm.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not request.is_finished:
            continue
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0
