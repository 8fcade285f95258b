"""`saga web`: the operators' console in a browser."""
