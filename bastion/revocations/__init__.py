"""Token revocation: a role taken away in Keycloak stops counting within seconds, not when the token expires.

The audit service watches the realm's admin events (`watcher`, rules in infra/revocation-triggers.yaml via
`triggers`) and publishes signed AccessRevoked events on identity.revocations.v1; every service reads them
(`feed`) into the tokens its validator refuses (`revoked`). docs/security.md, "Temporal authorization".
"""
