"""Record-level differential privacy on the clinic (DESIGN §5): accountant and persisted ledger."""
