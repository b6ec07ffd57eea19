"""Protocol peers: faithful stand-ins for the PBXs and platforms the adapters talk to."""
