"""Telephony at the I/O edge: the connector core and one driver per PBX."""
