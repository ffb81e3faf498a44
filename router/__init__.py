"""lmfleet's router: the OpenAI HTTP API and the lmfleet.v1 gRPC API in front of workers.

Entry points: `lmfleet.router.server.Router` / `serve_router` and `lmfleet router`.
"""
