"""Whether a request may run: who it is charged to, what it may cost, and the budget decision."""
