"""Clinic <-> server sync (DESIGN §8): wire formats shared by both sides, and the clinic client."""
