"""Shared by every service: contract/ (what crosses the broker), plumbing/, and the error tree."""
