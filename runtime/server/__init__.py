"""`runtime serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

Layout: `app` (factory, /health, /v1/models, /metrics, graceful uvicorn server), `async_engine`
(the engine loop on its own thread), `protocol` (request bodies), `completions` and `chat`
(the endpoints), `serving` (what they share), `state`, `errors`, `metrics`.

Behaviour where the OpenAI API leaves us a choice (keep docs/ in step):

- A full waiting queue (`--max-queued-requests`, counted in requests not yet admitted) answers
  **503** `ServiceUnavailableError` with `Retry-After: 1`, before any work, and counts
  `runtime:num_requests_rejected_total`. The `openai` client retries 503 by itself. A
  request with more choices (prompts x n) than the queue holds is a 400: it could never fit.
- Limits, timeouts, the API key and the Host check: `limits`, `parsing`, `middleware`,
  `security`, `http` (docs/serving.md, "Limits" and "Access").
- Loading, a failed load, and a dead engine loop are 503 on every endpoint and on /health.
- A request that fails inside the engine (a forward pass raising) is a 500: a JSON error, or,
  once streaming, an `{"error": ...}` event followed by `data: [DONE]`. No 500 carries an
  exception's text: it names a reference to find it in the log.
- On SIGTERM or Ctrl-C the socket closes, in-flight requests run for up to
  `--shutdown-timeout` seconds, then the rest end with a 503 error event (or JSON error) and
  `[DONE]`; the process exits 0.
- A client that disconnects is aborted at the next engine step; it is counted in
  `runtime:request_success_total{finished_reason="abort"}`.
"""
