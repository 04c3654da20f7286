"""Bastion: a reference platform for secure, event-driven, eventually consistent microservices."""
