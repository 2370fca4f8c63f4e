"""The service room: a request from its draft to the engine (plan checks, admission, capacity, jobs, records)."""
