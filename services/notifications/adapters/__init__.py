"""Adapters of the notifications service: at-rest encryption of personal data, PostgreSQL storage."""
