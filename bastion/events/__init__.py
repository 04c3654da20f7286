"""Signed events: envelope, keys, trust policy, the verifying consumer, the transactional outbox and inbox."""
