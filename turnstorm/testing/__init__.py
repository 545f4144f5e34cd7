"""Test helpers that ship with the package (like ``kopf.testing``): a real control plane."""
