"""Safe rollouts: live weights for every Envoy (RTDS), the admin API, and the state they persist."""
