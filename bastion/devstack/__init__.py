"""The devstack: fetch, configure, start, supervise and stop the platform's infrastructure on one machine."""
