"""Committed nsjail profiles and kafel seccomp policies, shipped inside the wheel as data."""
