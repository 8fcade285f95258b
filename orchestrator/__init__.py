"""The order saga orchestrator: definition (data), engine (pure), store and runtime (I/O)."""
