"""Keeping a repository healthy: verify, prune with retention rules, gc, damage reports."""
