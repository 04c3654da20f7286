"""The notifications service: tells account owners what happened to their money, from verified events."""
