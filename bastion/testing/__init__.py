"""Test helpers shipped with the library: fakes and minters that unit tests use instead of patching internals."""
