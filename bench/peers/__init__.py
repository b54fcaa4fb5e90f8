"""Model servers of the peers slimserve is compared with; each runs in its own virtualenv (bench/.venvs/)."""
