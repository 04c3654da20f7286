"""One module per infrastructure component the devstack runs: PostgreSQL, Redis, Kafka, Keycloak."""
