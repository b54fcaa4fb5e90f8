"""The management use cases (control), optimization jobs and the read-only replica watcher, on a thread pool of their own."""
