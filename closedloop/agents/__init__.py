"""Policies and baselines that produce rollouts."""
