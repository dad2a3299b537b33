"""The math, pure torch plus an optional process group (never slime): divergences and their gradients, token filters
and importance weights, the teacher pass's micro-batch counts, the host-memory estimate."""
