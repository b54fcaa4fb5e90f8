"""The `auto` search and the accuracy budget's bisection."""
