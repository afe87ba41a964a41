"""Mixture-of-Experts building blocks: routing, token dispatch, expert banks and balancing losses."""
