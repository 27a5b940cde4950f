"""Per-request LoRA adapters on the DiT decoder: the PEFT adapter format (``format``), grouped
per-row deltas inside one batch (``layers``), the adapter folders (``store``) and the device
cache (``registry``)."""
