"""The tamper-evident audit store: an append-only, hash-chained log in PostgreSQL, signed checkpoints kept
outside the database, a streaming verifier, and event-sourced projections rebuilt from the log.

Modules, pure ones first (nothing imports a module below it in this list):
- `records`: `AuditRecord` (what is kept of each consumed Kafka record) and `canonical_bytes`;
- `chain`: `record_hash`, `extend` (link records after a head), `LogEntry`, `Head`, `GENESIS_HASH`;
- `checkpoints`: `Checkpoint` (signed-note bytes and JSON line), `sign_checkpoint`, `verify_checkpoint`,
  `CheckpointFile` (the append-only 0600 file), `Checkpointer` (every N records or T seconds);
- `verify`: `check_chain` over entries and checkpoints, giving a `ChainReport`;
- `projections`: the pure fold `Projections.apply` and its rows;
- `postgres`: `install` (DDL, trigger, grants), `AuditLog` (append, head, iter_rows, check_chain),
  `rebuild`, `dump`, `digests`, the tables and `entry_of_row` for queries of one's own;
- `errors`: `AuditError` and its subclasses.
"""
