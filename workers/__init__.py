"""The saga's participants: one shared runtime, and inventory, payment and order logic."""
