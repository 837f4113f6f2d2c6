"""`plainllama serve`: an OpenAI-compatible HTTP server.

app.py        the HTTP routes (Starlette on uvicorn): requests in, JSON or server-sent events out
requests.py   an OpenAI request's fields, checked, as a Job for the scheduler
responses.py  the JSON shapes OpenAI's API answers with
scheduler.py  the engine thread: every running request decoded in one pass per step
metrics.py    counters for GET /metrics (Prometheus's text format)
"""
