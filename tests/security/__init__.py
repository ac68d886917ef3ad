"""Security regression tests (issue 9): each names the attack it replays."""
