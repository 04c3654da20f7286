"""The gRPC kit: server and client factories, interceptors, policies."""
