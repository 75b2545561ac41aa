"""remora.placement: where the functions and state of a stateful serverless application run on edge nodes."""
