"""Rollouts: anytime-valid gates (sequential.py), plans (plan.py), the record (state.py), arm statistics (gates.py), the stage machine (controller.py)."""
