"""Counters of the signed-events kit (Prometheus), labelled so an alert can name the consumer and reason."""

from prometheus_client import Counter, Gauge

EVENTS_APPLIED = Counter("bastion_events_applied_total", "Events applied by a verifying consumer",
                         ["consumer", "topic"])
EVENTS_REJECTED = Counter("bastion_events_rejected_total", "Events refused and sent to the dead-letter topic",
                          ["consumer", "topic", "reason"])
EVENTS_DROPPED = Counter("bastion_events_dropped_total", "Redelivered or replayed events dropped without effect",
                         ["consumer", "topic", "reason"])
EVENTS_HELD = Counter("bastion_events_held_total", "Events held back behind a sequence gap",
                      ["consumer", "topic"])
EVENTS_GAPS_OPEN = Counter("bastion_events_sequence_gaps_total",
                           "Sequence gaps that stayed open past the consumer's wait, events held behind them",
                           ["consumer", "topic"])
# Unix time up to which the audit service's watch on the realm last said every revocation was published, as each
# service read it (bastion/revocations/feed.py): alert when it lags the clock by more than a few seconds; past a minute
# the service refuses every token.
REVOCATIONS_WATCHED_UNTIL = Gauge("bastion_revocations_watched_until_seconds",
                                  "When the realm's watch last said every revocation before it was published",
                                  ["consumer"])
