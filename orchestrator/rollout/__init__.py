"""The rollout: two-phase commit across TP ranks, the update lock, recovery, rank agents and their
engine adapters, and the supervisor of local agents.
"""
