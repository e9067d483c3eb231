"""Drivers of peers' own code (each in a folder of its own), used to measure and check ours beside theirs."""
