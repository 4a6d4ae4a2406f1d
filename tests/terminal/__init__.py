"""Tests that drive jr's tools on a real terminal (tmux), as an operator would."""
