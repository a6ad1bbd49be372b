"""serving/: the HTTP service below deploy_with_limits.py. The request path runs one way:
deploy_with_limits.py (HTTP, the only reader of flask's request) -> worker.py (a gunicorn worker's model
and the request lifecycle) -> engine.py (the scheduler thread that owns the model; engine_requests.py is
what it takes). Around them: http.py (what is read from a request, passed in), openai_wire.py (the wire
format), accounting.py (each request's one record), sampling.py, rate_limits.py, monitoring.py and
dashboard.html. May import every other wing and the top of common/; nothing imports serving/.
"""
