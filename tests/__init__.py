"""The test suite (a package, so that benchmarks can ``import tests.naive_freekd``)."""
