"""Resilience for calls to other services: circuit breakers with shared state, and budgeted retries."""
