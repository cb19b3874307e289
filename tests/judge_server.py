"""A local stand-in for the judge providers: a real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions
and Anthropic Messages wire formats, with scripted behaviour (rate limits, malformed replies)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def judge_reply(prompt: str) -> dict[str, float]:
    """Top log-probabilities a judge would give: low scores for answers saying BAD, CODE for code, else high."""
    answer = prompt.split("<answer>")[-1]
    if "BAD" in answer:
        return {"10": -0.2, "20": -1.8, "CODE": -5.0}
    if "def " in answer:
        return {"CODE": -0.05, "50": -3.5}
    return {"90": -0.1, "80": -2.4, "REFUSAL": -6.0}


class Handler(BaseHTTPRequestHandler):
    server: "JudgeServer"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, body: dict | str, headers: dict | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.requests.append({"path": self.path, "body": request, "headers": {k.lower(): v for k, v in self.headers.items()}})
            rate_limited = srv.rate_limit_next > 0
            if rate_limited:
                srv.rate_limit_next -= 1
        if rate_limited:
            return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                              {"retry-after": "0"})
        prompt = request["messages"][-1]["content"]
        if "MALFORMED" in prompt.split("<answer>")[-1]:
            return self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "9"},
                                                 "finish_reason": "length", "logprobs": None}]})
        top = judge_reply(prompt)
        best = max(top, key=top.get)
        if self.path.endswith("/messages"):  # Anthropic Messages API: text only
            return self._send(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": request["model"],
                                    "content": [{"type": "text", "text": best}], "stop_reason": "max_tokens",
                                    "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}})
        entries = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]
        return self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": request["model"],
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": best},
                         "logprobs": {"content": [{"token": best, "logprob": top[best], "bytes": None,
                                                   "top_logprobs": entries}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}})


class JudgeServer(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.rate_limit_next = 0  # answer this many requests with 429 first
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"
