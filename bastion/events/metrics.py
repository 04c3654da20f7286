"""Counters of the signed-events kit (Prometheus), labelled so an alert can name the consumer and reason."""

from prometheus_client import Counter

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
