"""The synthetic demo workspace shipped for `doppel local --demo` and the tests."""
