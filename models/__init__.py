"""Zoo entries: one module per model (a Pyro model, its guides, and the loss that trains them)."""
