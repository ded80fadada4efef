"""Native CPU kernels for what XLA:CPU's libraries run slowly, built on first use."""
