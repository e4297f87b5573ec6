"""World tests: one CPU thread (the tiny models thrash with two on a shared machine)."""

from tests.threads import one_cpu_thread  # noqa: F401  (autouse here)
