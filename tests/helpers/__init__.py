"""Helpers shared by the test modules (not tests themselves): `launch` runs scripts under a real
multi-process `accelerate launch`."""
