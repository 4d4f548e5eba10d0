"""The FastAPI controller: REST API, auth, the search queue and the dashboard."""
