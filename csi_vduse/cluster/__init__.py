"""Volumes on many nodes: intent in Kubernetes objects, the agent of each node acting on it."""
