"""The operations room: metrics, the engine watchdog, drain, logging, the start-up heap, model files."""
