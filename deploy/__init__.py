"""Deployment helpers: the local stack without Docker."""
