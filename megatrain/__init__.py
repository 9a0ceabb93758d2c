"""megatrain."""
