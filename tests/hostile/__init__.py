"""Hostile-input suite: real relay and client processes under attack from this process."""
